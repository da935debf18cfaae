"""Named chat templates (Jinja, Hugging Face `chat_template` format) and their control strings.

Every template marks assistant content and its end-of-turn token with `{% generation %}` so
`apply_chat_template(..., return_assistant_tokens_mask=True)` yields exact loss masks. Generation
prompts end in a control token or a newline, never a space: with byte-level BPE a trailing space
merges into the next word, and the prompt would stop being a token prefix of the conversation
(`stages.format` checks this on golden conversations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.common.io import InputError


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # control strings a row must never contain
    eot: str  # end-of-turn string closing every assistant turn
    # The same prompt in Ollama's Go template syntax (Modelfile TEMPLATE), over `.Messages`, ending with the
    # generation prompt; {bos} / {eos} stand for the tokenizer's strings. None: no Ollama equivalent written.
    ollama: str | None = None


LLAMA3 = ChatTemplate(
    name="llama3",
    jinja=(
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
        "{% else %}{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ),
    eot="<|eot_id|>",
    ollama=(
        "{bos}{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
)

CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ message['content'] | trim }}{{ '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    eot="<|im_end|>",
    ollama="{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
)

LLAMA2 = ChatTemplate(
    name="llama2",
    jinja=(
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
        "{% endif %}{% endfor %}"
    ),
    special_tokens=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    eot="</s>",
)

ZEPHYR = ChatTemplate(
    name="zephyr",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] | trim + eos_token }}{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ message['content'] | trim + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    special_tokens=("<|system|>", "<|user|>", "<|assistant|>"),
    eot="</s>",
    ollama="{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{eos}\n{{ end }}<|assistant|>\n",
)

PLAIN = ChatTemplate(
    name="plain",
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}"
        "{{ 'Assistant:\n' }}{% generation %}{{ message['content'] | trim + eos_token }}{% endgeneration %}{{ '\n' }}"
        "{% elif message['role'] == 'system' %}{{ message['content'] | trim + '\n' }}"
        "{% else %}{{ 'User: ' + message['content'] | trim + '\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
    ),
    special_tokens=(),
    eot="</s>",
    ollama=(
        '{{ range .Messages }}{{ if eq .Role "assistant" }}Assistant:\n{{ .Content }}{eos}\n'
        '{{ else if eq .Role "system" }}{{ .Content }}\n{{ else }}User: {{ .Content }}\n{{ end }}'
        "{{ end }}Assistant:\n"
    ),
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (LLAMA3, CHATML, LLAMA2, ZEPHYR, PLAIN)}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}") from None


def install_template(tokenizer, choice: str) -> str:
    """Apply `model.chat_template` to a tokenizer; returns where its template came from.

    `auto` keeps the tokenizer's own template (llama3 when it has none); a name installs that template
    over whatever the tokenizer shipped.
    """
    if choice == "auto":
        if tokenizer.chat_template:
            return "tokenizer"
        choice = LLAMA3.name
    tokenizer.chat_template = get_template(choice).jinja
    return choice


def load_base_tokenizer(path, choice: str):
    """(tokenizer, template source): the tokenizer in `path` (models/base) with `model.chat_template` applied."""
    from transformers import AutoTokenizer

    from stages.common.io import require

    tokenizer = AutoTokenizer.from_pretrained(str(require(path, "base tokenizer")))
    return tokenizer, install_template(tokenizer, choice)


_PROBE = "QZXJ-probe-content"


class ContractError(InputError):
    """The chat template / tokenizer contract is violated; training must not start."""


def end_of_turn(tokenizer: Any) -> str:
    """The control string the template writes right after assistant content (e.g. <|eot_id|>)."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    rest = text[text.rindex(_PROBE) + len(_PROBE) :].lstrip(" ")
    specials = {t.content for t in tokenizer.added_tokens_decoder.values()} | set(
        tokenizer.all_special_tokens
    )
    for s in sorted(specials, key=len, reverse=True):
        if s and rest.startswith(s):
            return s
    raise ContractError(
        f"chat template writes no special end-of-turn token after assistant content (got {rest!r})"
    )


def set_end_of_turn_eos(generation_config: Any, tokenizer: Any) -> list[int]:
    """Make `generation_config.eos_token_id` include the template's end-of-turn token (and the tokenizer's EOS).

    Called wherever a model is saved, so `model.generate()` stops where answers end (the Llama 3
    `<|end_of_text|>` 128001 vs `<|eot_id|>` 128009 failure). Ids already there are kept. Returns the ids.
    """
    current = generation_config.eos_token_id
    ids = list(current) if isinstance(current, list | tuple) else [] if current is None else [current]
    for token_id in (tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)), tokenizer.eos_token_id):
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def ollama_template(tokenizer: Any) -> str | None:
    """The Go template for Ollama equivalent to the tokenizer's chat template; None when none is known."""
    for template in TEMPLATES.values():
        if template.ollama and tokenizer.chat_template == template.jinja:
            return template.ollama.replace("{bos}", tokenizer.bos_token or "").replace("{eos}", tokenizer.eos_token or "")
    return None
