import contextlib
import importlib
import os
import sys

import numpy as np
import pytest
import torch

# A model small enough for a CPU training step in well under a second (about 0.1M parameters)...
TINY_MODEL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128"]
# ...and a short dense run of it that logs every step. Tests import these (`from conftest import
# SMALL_RUN`) and append what they need; later overrides win.
SMALL_RUN = [*TINY_MODEL, "data.seq_len=128", "data.micro_batch=2", "schedule.warmup_steps=2",
             "schedule.decay=constant", "schedule.lighthouse_steps=0", "logging.log_interval=1",
             "logging.eval_batches=1"]

# Where the kernels allocate the buffers they write their outputs into.
KERNEL_MODULES = ("lh_dist.ops", "lh_dist.parallel")


def pytest_configure(config):
    # Without CUDA, Triton kernels run in Triton's interpreter (`triton_interpreter`). `triton.jit` picks
    # the interpreter when it decorates a function, Triton's own library included, so Triton is imported
    # here, before the tests import it, with TRITON_INTERPRET=1; nothing else here runs Triton on a CPU.
    if torch.cuda.is_available() or "triton" in sys.modules or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]  # processes that tests start import Triton as usual


def pytest_collection_modifyitems(items):
    # tests/unit first: its failures show within minutes, before any process is started.
    items.sort(key=lambda item: "integration" in item.path.parts)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory):
    """A small real dataset: the first standard-library sources, tokenized into MDS shards by lh-data."""
    from lh_dist.data.cli import main as lh_data

    out = tmp_path_factory.mktemp("data") / "stdlib"
    assert lh_data(["stdlib", "--out", str(out), "--max-docs", "120", "--val-fraction", "0.05"]) == 0
    return out


def _synthetic_documents():
    # Lengths from 1 to a few hundred bytes: some documents span several samples.
    rng = np.random.default_rng(0)
    for i in range(120):
        yield f"doc{i:03}", "".join(chr(97 + (i + j) % 26) for j in range(int(rng.integers(1, 300))))


@pytest.fixture(scope="module")
def packed_dataset(tmp_path_factory):
    """120 made-up documents of 1 to 300 bytes, byte-tokenized into MDS shards of 4 KiB (a fifth in val)."""
    from lh_dist.data.shards import write_dataset
    from lh_dist.data.tokenizer import ByteTokenizer

    path = tmp_path_factory.mktemp("packed") / "data"
    write_dataset(_synthetic_documents(), path, ByteTokenizer(), source="test", val_fraction=0.2, shard_size=4096,
                  log=lambda _: None)
    return path


PACKED_SEQ_LEN = 63


def packed_loader(path, split="train", **overrides):
    """A PackedLoader over `path` as the data-loader tests read it (PACKED_SEQ_LEN, 2 samples a batch, seed 7)."""
    from lh_dist.data.loader import PackedLoader

    kwargs = dict(seq_len=PACKED_SEQ_LEN, micro_batch=2, dp_rank=0, dp_degree=1, seed=7) | overrides
    return PackedLoader(str(path), split, **kwargs)


@contextlib.contextmanager
def nan_filled_allocations(modules: tuple[str, ...] = KERNEL_MODULES):
    """torch.empty, torch.empty_like and Tensor.new_empty, when called from a module under `modules`,
    return floating tensors filled with NaN: an output element that a kernel never writes stays NaN
    and fails every comparison, where uninitialized memory could happen to hold the right value."""
    originals = torch.empty, torch.empty_like

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            out = allocate(*args, **kwargs)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if out.is_floating_point() and caller.startswith(modules):
                out.fill_(float("nan"))
            return out

        return allocate_nan

    torch.empty, torch.empty_like = poisoned(torch.empty), poisoned(torch.empty_like)
    torch.Tensor.new_empty = poisoned(torch.Tensor.new_empty)  # shadows torch._C.TensorBase's method
    try:
        yield
    finally:
        torch.empty, torch.empty_like = originals
        del torch.Tensor.new_empty


@pytest.fixture
def nan_filled_empty():
    """`nan_filled_allocations` for one test: op tests use it (`pytestmark = usefixtures(...)`)."""
    with nan_filled_allocations():
        yield


@pytest.fixture
def triton_interpreter(monkeypatch):
    """lh_dist's Triton kernels (the module, returned) run by Triton's interpreter in this process, on
    CPU tensors. Skipped where Triton was imported for a GPU: there the `gpu` tests run the kernels."""
    triton = pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.zeros, InterpretedFunction):
        pytest.skip("Triton runs compiled here (CUDA); its interpreter runs where there is no GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the "triton" backend take CPU tensors
    from lh_dist.ops.lighthouse import triton_kernels

    return importlib.reload(triton_kernels)  # decorated again, now by the interpreter
