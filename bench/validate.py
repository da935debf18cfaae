"""Benchmark the `validate` stage: speed, memory and near-duplicate recall/precision.

Run: python bench/validate.py [--rows 100000] [--dup-share 0.05] [--sample 5000] [--out reports/bench_validate.json]
     python bench/validate.py --datasketch    # also time datasketch's MinHashLSH (pip install -e ".[bench]")

Writes N synthetic SFT rows (~200 tokens each in the tiny tokenizer) of which dup-share are planted
near-duplicates (a copy of another row with 1-3 words substituted), runs read_source + validate()
in a child process (wall time and peak RSS of that process), then measures the stage's
near-duplicate detection against an exact all-pairs Jaccard on a sample of the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ch"]


def vocabulary(n: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(words)


def make_rows(n: int, dup_share: float, seed: int) -> tuple[list[dict], dict[int, int]]:
    """Rows plus {planted row: original row}."""
    rng = random.Random(seed)
    vocab = vocabulary(5000, rng)
    weights = [1 / (i + 10) for i in range(len(vocab))]  # Zipf-like word frequencies

    def text(k: int) -> str:
        return " ".join(rng.choices(vocab, weights, k=k)).capitalize() + "."

    n_dup = int(n * dup_share)
    rows = [
        {
            "id": f"r{i}",
            "source": "bench",
            "messages": [
                {"role": "user", "content": text(rng.randint(12, 20))},
                {"role": "assistant", "content": text(rng.randint(75, 95))},
            ],
        }
        for i in range(n - n_dup)
    ]
    planted: dict[int, int] = {}
    for d, src in enumerate(rng.sample(range(n - n_dup), n_dup)):  # one planted copy per original
        row = json.loads(json.dumps(rows[src]))
        words = row["messages"][1]["content"].split()
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        row["messages"][1]["content"] = " ".join(words)
        row["id"] = f"dup{d}"
        planted[len(rows)] = src
        rows.append(row)
    order = list(range(len(rows)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    return [rows[i] for i in order], {position[d]: position[s] for d, s in planted.items()}


def child(data: Path, tok_dir: Path, result_path: Path) -> None:
    """Time read_source + validate() in this process and record its peak RSS."""
    from transformers import AutoTokenizer

    from stages.common.config import load_params
    from stages.common.readers import read_source
    from stages.validate import control_strings, token_counter, validate

    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").validate
    cfg = cfg.model_copy(update={"max_tokens": 512})  # no length rejects: keep the dedup figures clean
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    t0, c0 = time.perf_counter(), time.process_time()
    _, rows = read_source(data, "sft", "openai")
    result = validate(rows, cfg, token_counter(tokenizer, cfg.max_tokens), control_strings(tokenizer))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    lengths = token_counter(tokenizer)([r.obj["messages"] for r in rows[:2000]])
    out = {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "load_average": os.getloadavg(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "mean_tokens_per_row": round(float(np.mean(lengths)), 1),
        "report": result.report,
        "rejects": [
            {"line": r["line"], "reason": r["reason"], "detail": r["detail"], "id": r["row"]["id"]}
            for r in result.rejects
        ],
    }
    result_path.write_text(json.dumps(out))


def exact_pairs(texts: list[str], threshold: float, k: int) -> set[tuple[int, int]]:
    """All pairs with word-shingle Jaccard >= threshold, by sparse matrix product (exact)."""
    from scipy import sparse

    from stages.common.dedup import shingle_sets

    sets = shingle_sets(texts, k)
    _, cols = np.unique(sets.flat, return_inverse=True)
    rows = np.repeat(np.arange(len(texts)), np.diff(sets.offsets))
    x = sparse.csr_matrix(
        (np.ones(len(cols), dtype=np.int32), (rows, cols)), shape=(len(texts), cols.max() + 1)
    )
    inter = (x @ x.T).tocoo()
    size = np.diff(sets.offsets)
    keep = inter.row < inter.col
    i, j, v = inter.row[keep], inter.col[keep], inter.data[keep]
    jac = v / (size[i] + size[j] - v)
    return {(int(a), int(b)) for a, b in zip(i[jac >= threshold], j[jac >= threshold], strict=True)}


def compare_datasketch(texts: list[str], threshold: float, k: int, num_perm: int, seed: int) -> dict:
    """Near-duplicate pairs by stages/common/dedup.py vs datasketch's MinHash + MinHashLSH on the same
    shingles, bands and exact-Jaccard confirmation; CPU seconds of this process for each."""
    from datasketch import MinHash, MinHashLSH

    from stages.common.dedup import lsh_params, near_duplicate_pairs, shingle_sets

    c0 = time.process_time()
    ours = {(i, j) for i, j, _ in near_duplicate_pairs(texts, threshold, k, num_perm, seed)}
    c1 = time.process_time()
    sets = shingle_sets(texts, k)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_params(threshold, num_perm))
    sigs = []
    for i in range(len(texts)):
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme="affine64")  # our 64-bit shingle hashes
        m.update_batch(sets.doc(i).tolist())
        sigs.append(m)
    c2 = time.process_time()
    with lsh.insertion_session() as session:
        for i, m in enumerate(sigs):
            session.insert(i, m, check_duplication=False)
    candidates = {(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j > i}
    theirs = {(i, j) for i, j in candidates if sets.jaccard(i, j) >= threshold}
    c3 = time.process_time()
    return {"texts": len(texts), "numpy_cpu_seconds": round(c1 - c0, 2),
            "datasketch_cpu_seconds": round(c3 - c1, 2), "datasketch_minhash_cpu_seconds": round(c2 - c1, 2),
            "pairs_numpy": len(ours), "pairs_datasketch": len(theirs), "pairs_only_numpy": len(ours - theirs),
            "pairs_only_datasketch": len(theirs - ours), "datasketch_candidates": len(candidates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dup-share", type=float, default=0.05)
    ap.add_argument("--sample", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("reports/bench_validate.json"))
    ap.add_argument("--datasketch", action="store_true", help="also time datasketch's MinHashLSH on the rows")
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from stages.base import build_tokenizer
    from stages.common.config import load_params
    from stages.common.templates import get_template

    cfg = load_params(Path(__file__).resolve().parents[1] / "params.yaml").validate
    t0 = time.perf_counter()
    rows, planted = make_rows(args.rows, args.dup_share, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data, tok_dir, res = Path(tmp) / "sft.jsonl", Path(tmp) / "tok", Path(tmp) / "result.json"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        corpus = [m["content"] for r in rows[:3000] for m in r["messages"]]
        build_tokenizer(corpus, 1024, get_template("llama3")).save_pretrained(tok_dir)
        print(
            f"generated {len(rows)} rows ({len(planted)} planted) in {time.perf_counter() - t0:.1f}s; "
            f"load average {os.getloadavg()}",
            flush=True,
        )
        env = {
            **os.environ,
            "RAYON_NUM_THREADS": "2",
            "OMP_NUM_THREADS": "2",
            "TOKENIZERS_PARALLELISM": "true",
        }
        subprocess.run(
            [sys.executable, __file__, "--child", str(data), str(tok_dir), str(res)], check=True, env=env
        )
        run = json.loads(res.read_text())

    # Clusters the stage formed: every duplicate reject points at the row it kept.
    index = {r["id"]: i for i, r in enumerate(rows)}
    cluster = list(range(len(rows)))
    for rej in run["rejects"]:
        if rej["reason"] in ("duplicate", "near_duplicate"):
            cluster[index[rej["id"]]] = index[rej["detail"].rsplit(" ", 1)[1]]

    # Sample whole planted groups so near-duplicates appear in the sample at the data's rate.
    rng = random.Random(args.seed + 1)
    dups_of: dict[int, list[int]] = defaultdict(list)
    for d, s in planted.items():
        dups_of[s].append(d)
    originals = [i for i in range(len(rows)) if i not in planted]
    rng.shuffle(originals)
    sample: list[int] = []
    for o in originals:
        if len(sample) >= args.sample:
            break
        sample += [o] + dups_of.get(o, [])
    texts = ["\n".join(m["content"] for m in rows[i]["messages"]) for i in sample]
    t1 = time.perf_counter()
    truth = {(sample[a], sample[b]) for a, b in exact_pairs(texts, cfg.near_dup_threshold, cfg.shingle_size)}
    truth = {tuple(sorted(p)) for p in truth}
    exact_seconds = time.perf_counter() - t1
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for i in sample:
        by_cluster[cluster[i]].append(i)
    found = {
        tuple(sorted((a, b)))
        for members in by_cluster.values()
        for x, a in enumerate(members)
        for b in members[x + 1 :]
    }
    tp = len(truth & found)
    figures = {
        "rows": len(rows),
        "planted_near_duplicates": len(planted),
        "validate_seconds": run["seconds"],
        "validate_cpu_seconds": run["cpu_seconds"],
        "load_average_during": run["load_average"],
        "peak_rss_mb": run["peak_rss_mb"],
        "mean_tokens_per_row": run["mean_tokens_per_row"],
        "rejected": run["report"]["reasons"],
        "duplicates": run["report"]["duplicates"],
        "sample_rows": len(sample),
        "sample_true_pairs": len(truth),
        "sample_found_pairs": len(found),
        "recall": round(tp / len(truth), 4) if truth else None,
        "precision": round(tp / len(found), 4) if found else None,
        "exact_all_pairs_seconds": round(exact_seconds, 2),
        "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(),
        "targets": {"validate_seconds": 60, "peak_rss_mb": 4096, "recall": 0.95, "precision": 0.99},
    }
    if args.datasketch:
        all_texts = ["\n".join(m["content"] for m in r["messages"]) for r in rows]
        figures["datasketch"] = compare_datasketch(all_texts, cfg.near_dup_threshold, cfg.shingle_size,
                                                   cfg.num_perm, cfg.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
