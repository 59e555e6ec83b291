"""The GPU check's harness (benchmarks/gpu_check.py): its clock, its report, and models with random weights.

The report is plain dicts (sections of tables, checks, notes and an error), written as JSON and markdown after
every section, so a run cut short still leaves what it measured. The models are made on the device (a 1.5B
model in seconds, not minutes on the CPU) and saved as Hugging Face folders with an offline word-level
tokenizer: nothing is downloaded.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the deadline counts from here (imported first), torch's import included

import contextlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (read when huggingface_hub is imported)

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the checkout this file belongs to
PAD, BOS, EOS = 0, 1, 2  # the word-level tokenizer's special ids; prompts draw ids from 3 up


@dataclass
class Ctx:
    device: str
    sizes: object  # gpu_check.Sizes
    tmp: Path  # the model folders
    armed: bool = False  # inside a section: the deadline's alarm raises there only, never while reporting
    launch_ms: float = 0.0  # three tiny kernels replayed from a CUDA graph (the attention section measures it)

    def left(self) -> float:
        return STARTED + self.sizes.deadline_s - time.monotonic()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


class Deadline(BaseException):
    """Raised by SIGALRM at the deadline; a BaseException so no library's `except Exception` swallows it."""


def log(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


# -------------------------------------------------------------------------------------------------
# The report: sections as plain dicts (tables, checks, notes, error), written as JSON and markdown after each

class Report:
    def __init__(self, out: Path, ctx: Ctx, argv: list[str]):
        self.out, self.sections = out, []
        self.head = {"command": "python " + shlex.join(argv), "device": ctx.device, "smoke": ctx.device == "cpu",
                     "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def section(self, name: str) -> dict:
        self.sections.append(dict(name=name, status="running", seconds=None, tables=[], checks=[], notes=[],
                                  error=None))
        return self.sections[-1]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps({**self.head, "sections": self.sections}, indent=1))
        (self.out / "report.md").write_text(self.markdown())

    def markdown(self) -> str:
        lines = ["# ttc GPU check", "", f"`{self.head['command']}` on {self.head['device']}, started "
                 f"{self.head['started_utc']}", "", "| section | status | seconds |", "| --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['status']} | {_fmt(s['seconds'])} |" for s in self.sections]
        for s in self.sections:
            lines += ["", f"## {s['name']}: {s['status']}", ""]
            lines += [f"- {'check' if c['must'] else 'target'} {'PASS' if c['passed'] else 'FAIL'}: {c['name']}"
                      for c in s["checks"]]
            lines += [f"- {n}" for n in s["notes"]]
            for t in s["tables"]:
                lines += ["", f"**{t['title']}**", "", "| " + " | ".join(t["columns"]) + " |",
                          "|" + " --- |" * len(t["columns"])]
                lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in t["rows"]]
            if s["error"]:
                lines += ["", "```", s["error"].rstrip(), "```"]
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"


def table(sec: dict, title: str, columns: list[str]) -> list:
    """A new table in the section; returns its row list to append to."""
    sec["tables"].append(dict(title=title, columns=columns, rows=[]))
    return sec["tables"][-1]["rows"]


def check(sec: dict, name: str, passed: bool, must: bool = True) -> None:
    """must: a failure fails the run (parity, correctness); else a performance target, reported only."""
    sec["checks"].append(dict(name=name, passed=bool(passed), must=must))
    log(f"{'PASS' if passed else 'FAIL'}: {name}")


@contextlib.contextmanager
def guarded(sec: dict, what: str):
    """An exception inside is written to the section (which then reports an error) and the section goes on."""
    try:
        yield
    except Exception:
        sec["error"] = (sec["error"] or "") + f"{what}:\n{traceback.format_exc()}\n"
        log(f"{what}: error\n{traceback.format_exc()}")


# -------------------------------------------------------------------------------------------------
# Models with random weights, made on the device and saved as Hugging Face folders

def bootstrap_ttc(root: Path = ROOT) -> None:
    """Make `ttc.*` the folders of the checkout at `root` (this one by default) without running ttc/__init__.py.

    pyproject maps top-level folders into one package (ttc/ -> ttc, kernels/ -> ttc.kernels, search/ ->
    ttc.search, ...). A bare package module whose __path__ is [root/ttc, root] resolves each to the same
    folder, installed or not; ttc/__init__.py (which imports the whole search layer) never runs.
    """
    _benchmarks_off_path()
    spec = importlib.machinery.ModuleSpec("ttc", None, is_package=True)
    spec.submodule_search_locations = [str(root / "ttc"), str(root)]
    sys.modules["ttc"] = importlib.util.module_from_spec(spec)
    import ttc.api

    assert Path(ttc.api.__file__).resolve().is_relative_to(root.resolve()), f"ttc.api came from {ttc.api.__file__}"


def import_ttc(root: Path = ROOT) -> None:
    """Import the checkout at `root` as the `ttc` package, ttc/__init__.py included: pyproject's folder mapping
    made by hand (its __path__ is [root/ttc, root]), for the `gpu` tests (`ttc.load`, `ttc.Ledger`) on a machine
    where ttc is a copy, not installed. Needs what `import ttc` needs (torch, numpy, tqdm), not math-verify."""
    _benchmarks_off_path()
    spec = importlib.util.spec_from_file_location("ttc", root / "ttc" / "__init__.py",
                                                  submodule_search_locations=[str(root / "ttc"), str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ttc"] = module
    spec.loader.exec_module(module)


def _benchmarks_off_path() -> None:
    """benchmarks/ holds search.py, serve.py...: off sys.path, so no top-level import finds them instead."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != here]


def word_level_tokenizer(vocab_size: int):
    """A tokenizer of vocab_size tokens "<unk>", "<s>", "</s>", "t3", ... made offline."""
    vocab = {"<unk>": PAD, "<s>": BOS, "</s>": EOS, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<unk>")


def make_model(ctx: Ctx, name: str, arch: str, cfg: dict, dtype: torch.dtype, sharpen: bool, seed: int = 0):
    """(folder, the transformers model on the device in dtype) with random weights; sharpen: 2-D weights x3, as
    tests/conftest.py's make_tiny_folder, so greedy decoding is decisive instead of a near-tie on uniform logits."""
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = cfg_cls(**cfg, max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS,
                     pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(ctx.device):  # initialized on the device: a 1.5B model in seconds, not minutes on the CPU
        model = model_cls(config)
    model = model.to(dtype).eval()
    if sharpen:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(3.0)
    folder = ctx.tmp / name
    model.save_pretrained(str(folder), safe_serialization=True)
    word_level_tokenizer(cfg["vocab_size"]).save_pretrained(str(folder))
    model.generation_config.eos_token_id = None  # transformers runs the asked length, as ttc with ignore_eos
    model.generation_config.pad_token_id = PAD
    return folder, model


def load_ttc(ctx: Ctx, folder: Path, dtype: str, kv_cache_gb: float, **extra):
    from ttc.api import load

    return load(str(folder), dtype=dtype, device=ctx.device, kv_cache_gb=kv_cache_gb, **extra)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def free(ctx: Ctx) -> None:
    """Return what dropped models held, so the next one starts with the GPU's memory free."""
    gc.collect()
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
