"""Talk to a model of the pipeline: an interactive REPL that streams tokens, or one answer for scripts.

    python -m stages.chat                              # models/final (the export), transformers
    python -m stages.chat --gguf q8_0                  # models/final's q8_0 GGUF in llama.cpp's runtime
    python -m stages.chat --model dpo|sft|base         # an earlier stage's model
    python -m stages.chat --prompt "How do I deal with failure?"   # one answer, then exit

Not a DVC stage. The conversation (the persona's system prompt from params.yaml, then every turn so far)
is rendered through the model's own chat template at each turn. In the REPL `/reset` clears the history
and `/exit` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO

from stages.common.config import Params, load_params
from stages.common.engine import load_for_inference
from stages.common.io import InputError, require, run_main
from stages.common.llamacpp import LlamaCpp, gguf_path
from stages.common.templates import set_end_of_turn_eos

log = logging.getLogger(__name__)

Message = dict[str, str]
MODELS = ("final", "dpo", "sft", "base")


class Chat(Protocol):
    def reply(self, messages: list[Message], on_text: Callable[[str], None]) -> str: ...


class TransformersChat:
    """A Hugging Face model; tokens stream through transformers' TextIteratorStreamer."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 0.0) -> None:
        if not tokenizer.chat_template:
            raise InputError("this model's tokenizer has no chat template; chat with --model final or dpo")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        set_end_of_turn_eos(model.generation_config, tokenizer)  # stop at the end of the answer

    def reply(self, messages: list[Message], on_text: Callable[[str], None]) -> str:
        from transformers import TextIteratorStreamer

        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(next(self.model.parameters()).device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        thread = threading.Thread(target=self.model.generate, kwargs={
            **inputs, "streamer": streamer, "max_new_tokens": self.max_new_tokens, **sampling})
        thread.start()
        parts = []
        for text in streamer:
            parts.append(text)
            on_text(text)
        thread.join()
        return "".join(parts).strip()


class GGUFChat:
    """A GGUF in llama.cpp's runtime, through the chat template embedded in the GGUF."""

    def __init__(self, gguf: Path, n_ctx: int, max_new_tokens: int, temperature: float = 0.0) -> None:
        self.llm = LlamaCpp(gguf, n_ctx=n_ctx)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def reply(self, messages: list[Message], on_text: Callable[[str], None]) -> str:
        return self.llm.chat(messages, self.max_new_tokens, self.temperature, on_text=on_text)["content"].strip()


class Conversation:
    """The persona's system prompt and the turns so far, in chat-template message form."""

    def __init__(self, system: str | None) -> None:
        self.system = system
        self.turns: list[Message] = []

    def messages(self, user: str) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def ask(self, chat: Chat, user: str, on_text: Callable[[str], None]) -> str:
        answer = chat.reply(self.messages(user), on_text)
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.turns = []


def repl(chat: Chat, conversation: Conversation, lines: Iterable[str], out: TextIO, prompt: str = "you> ") -> int:
    """Answer each line, streaming; returns the number of answers. `/reset` clears, `/exit` ends."""
    answered = 0
    out.write("Type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves.\n")
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            conversation.reset()
            out.write("(conversation cleared)\n")
        elif text:
            out.write("model> ")
            conversation.ask(chat, text, lambda t: (out.write(t), out.flush()))
            out.write("\n")
            answered += 1
        out.write(prompt)
        out.flush()
    return answered


def _stdin_lines(prompt: str) -> Iterable[str]:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    yield from iter(sys.stdin.readline, "")


def open_chat(params: Params, model: str, gguf: str | None, max_new_tokens: int, temperature: float) -> Chat:
    """The chat backend for --model / --gguf (paths from params.yaml)."""
    paths = params.paths
    if gguf:
        if model != "final":
            raise InputError("--gguf runs models/final's GGUF; leave --model at final")
        file = gguf_path(paths.final, params.generate.persona.name, gguf)
        require(file, f"{gguf} GGUF (is {gguf!r} in export.gguf? run `dvc repro export`)")
        return GGUFChat(file, n_ctx=0, max_new_tokens=max_new_tokens, temperature=temperature)
    folder = {"final": paths.final, "dpo": paths.dpo, "sft": paths.sft_merged, "base": paths.base}[model]
    hf_model, tokenizer = load_for_inference(require(folder, f"{model} model"), merge=True)
    return TransformersChat(hf_model, tokenizer, max_new_tokens, temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="final")
    parser.add_argument("--gguf", metavar="TYPE", help="a GGUF of models/final (f16, q8_0, ...) in llama.cpp")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system prompt (default: the persona's, from params.yaml)")
    parser.add_argument("--no-system", action="store_true", help="no system prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    args = parser.parse_args()
    params = load_params()
    chat = open_chat(params, args.model, args.gguf, args.max_new_tokens, args.temperature)
    conversation = Conversation(None if args.no_system else args.system or params.generate.persona.system_prompt)
    if args.prompt is not None:
        conversation.ask(chat, args.prompt, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        sys.stdout.write("\n")
        return
    repl(chat, conversation, _stdin_lines("you> "), sys.stdout)


if __name__ == "__main__":
    run_main(main)
