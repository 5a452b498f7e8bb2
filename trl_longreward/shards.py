"""One offline run split over N machines (`build-pairs` and `evaluate` with `--shard_index I --num_shards N`): which
prompts a shard owns, the manifest each shard writes, and the checks that shards fit together before they are merged
(`trl-longreward merge-shards`).

Shard I of N owns the generation groups g (prompts [g*B, (g+1)*B), B = `batch_size`) with g % N == I: round robin
over the groups a single machine would generate, so every prompt keeps its single-machine group and seed, and the
merged output is the one a single machine writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHARD_MANIFEST = "shard.json"

#: `LongRewardConfig` fields that say where and how fast the judge is reached, not what it answers: shards may differ.
JUDGE_TRANSPORT_FIELDS = (
    "judge_base_url",
    "judge_api_key_env",
    "judge_max_concurrency",
    "judge_endpoint_cooldown",
    "judge_timeout",
    "judge_max_retries",
    "embedding_base_url",
    "cache_path",
    "show_progress",
)


@dataclass
class MergeShardsArguments:
    """Arguments of `trl-longreward merge-shards`."""

    shards: list[str] = field(metadata={"help": "The output directories of all N shards (any order)."})
    output_dir: str = field(metadata={"help": "Directory for the merged output (not one of the shards)."})
    input: str | None = field(
        default=None,
        metadata={"help": "The input file, if it is not at the path the shards were run with (checked by hash)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = [self.shards]
        if not self.shards:
            raise ValueError("--shards needs the output directories of the shards to merge.")
        out = Path(self.output_dir).resolve()
        if any(Path(shard).resolve() == out for shard in self.shards):
            raise ValueError(f"--output_dir {self.output_dir!r} is one of the --shards: merge into a new directory.")


def check_shard_options(shard_index: int, num_shards: int) -> None:
    """`--shard_index I --num_shards N` with 0 <= I < N."""
    if num_shards < 1:
        raise ValueError(f"--num_shards must be >= 1, got {num_shards} (1: one machine does every prompt).")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"--shard_index must be in [0, --num_shards - 1] = [0, {num_shards - 1}], got {shard_index} "
            "(run shard 0, 1, ..., N-1 on N machines)."
        )


def shard_prompts(num_prompts: int, batch_size: int, shard_index: int, num_shards: int) -> list[int]:
    """The prompt indices shard `shard_index` of `num_shards` owns: those of the groups g (prompts [g*B, (g+1)*B))
    with g % num_shards == shard_index, in order. One shard owns every prompt."""
    return [i for i in range(num_prompts) if (i // batch_size) % num_shards == shard_index]


def documents_digest(documents: Iterable[tuple[str, str]]) -> str:
    """A hash of the (context, question) prompts of a run, in order: shards of one input agree on it."""
    digest = hashlib.sha256()
    for context, question in documents:
        for part in (context, question):
            data = part.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def judge_settings(config: Any) -> dict[str, Any]:
    """The `LongRewardConfig` fields that decide the judge's answers (not `JUDGE_TRANSPORT_FIELDS`), JSON-ready."""
    from dataclasses import asdict

    settings = {k: v for k, v in asdict(config).items() if k not in JUDGE_TRANSPORT_FIELDS}
    return json.loads(json.dumps(settings, default=str))


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Write `shard.json`, refusing a directory that holds another shard or a shard of another run: its lines would
    not be this shard's."""
    path = out_dir / SHARD_MANIFEST
    if path.exists():
        existing = json.loads(path.read_text(encoding="utf-8"))
        differences = _differences(existing, manifest)
        if differences:
            raise ValueError(
                f"--output_dir {str(out_dir)!r} holds {_describe(existing)}, and this run is "
                f"{_describe(manifest)} ({'; '.join(differences)}). Use a new --output_dir for each shard."
            )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_shards(directories: Sequence[str]) -> list[tuple[Path, dict[str, Any]]]:
    """The (directory, manifest) of every shard, ordered by shard index, after checking that they are the N shards
    of one run: one command, one input, the same settings, each index 0..N-1 exactly once."""
    shards = []
    for name in directories:
        directory = Path(name)
        path = directory / SHARD_MANIFEST
        if not path.is_file():
            raise ValueError(
                f"--shards: {name!r} holds no {SHARD_MANIFEST}: it is not the output of a run with --shard_index "
                "and --num_shards."
            )
        shards.append((directory, json.loads(path.read_text(encoding="utf-8"))))
    first_dir, first = shards[0]
    for directory, manifest in shards[1:]:
        differences = _differences(first, manifest, ignore=("shard_index",))
        if differences:
            raise ValueError(
                f"--shards {str(first_dir)!r} and {str(directory)!r} are not shards of one run: "
                f"{'; '.join(differences)}. Every shard runs the same command on the same input; only "
                "--shard_index and --output_dir differ."
            )
    by_index: dict[int, Path] = {}
    for directory, manifest in shards:
        index = manifest["shard_index"]
        if index in by_index:
            raise ValueError(
                f"--shards: shard {index} of {first['num_shards']} is given twice ({str(by_index[index])!r} and "
                f"{str(directory)!r})."
            )
        by_index[index] = directory
    missing = sorted(set(range(first["num_shards"])) - set(by_index))
    if missing:
        raise ValueError(
            f"--shards: shard(s) {', '.join(map(str, missing))} of {first['num_shards']} missing; give the output "
            "directories of all shards."
        )
    return sorted(shards, key=lambda item: item[1]["shard_index"])


def _describe(manifest: dict[str, Any]) -> str:
    return f"{manifest['command']} shard {manifest['shard_index']} of {manifest['num_shards']}"


def _differences(a: dict[str, Any], b: dict[str, Any], *, ignore: Sequence[str] = ()) -> list[str]:
    """`key: a_value vs b_value` for every key (nested one level, as `settings.seed`) where two manifests differ."""
    found = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or a.get(key) == b.get(key):
            continue
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            found += [f"{key}.{item}" for item in _differences(left, right)]
        else:
            found.append(f"{key}: {json.dumps(left, default=str):.80} vs {json.dumps(right, default=str):.80}")
    return found
