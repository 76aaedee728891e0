"""converters.torch_pickle reads torch checkpoints like torch.load does, and never runs their code.

torch is used here only to write fixtures and as the oracle (torch.load on files the test
wrote itself). The malicious corpus is built by the tests: hand-assembled opcode streams
and objects with hostile __reduce__, wrapped in every container the reader accepts.
"""
import argparse
import copyreg
import enum
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch writes these fixtures and is the oracle (torch.load)")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.torch_pickle import Inert, LazyTensor, load_torch_file, to_plain
from refimpl.errors import FormatError

FORMATS = ["zip", "legacy"]
NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
         torch.uint8: "U8", torch.bool: "BOOL"}


def save(obj, path, fmt, **kw):
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"), **kw)
    return path


def oracle(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def bits(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def assert_same(ours, ref, where="obj"):
    """Our result mirrors torch.load's: same containers, tensors with the same dtype, shape and bits."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, LazyTensor), where
        assert ours.dtype == NAMES[ref.dtype] and ours.shape == tuple(ref.shape), where
        assert ours.raw().tobytes() == bits(ref), where
        assert ours.nbytes == ref.numel() * ref.element_size(), where
        want = ref.detach().float() if ref.dtype == torch.bfloat16 else ref.detach()
        np.testing.assert_array_equal(ours.numpy(), want.numpy(), err_msg=where)
    elif isinstance(ref, dict):
        assert isinstance(ours, dict) and list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is (tuple if isinstance(ref, tuple) else list) and len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(ours, Inert), where
        assert_same(to_plain(ours), vars(ref), where)
    elif isinstance(ref, np.dtype):
        assert ours.dtype == ref, where
    elif isinstance(ref, np.ndarray):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, where
        np.testing.assert_array_equal(ours, ref)
    else:
        assert type(ours) is type(ref) and (ours == ref or (ours != ours and ref != ref)), where


def roundtrip(obj, tmp_path, fmt, name="ckpt.pt"):
    path = save(obj, str(tmp_path / name), fmt)
    ours = load_torch_file(path)
    assert_same(ours, oracle(path))
    return ours


def random_tensor(dtype, shape, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if t.numel() >= 3:
            t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------- faithful reading


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype(tmp_path, fmt):
    gen = torch.Generator().manual_seed(0)
    sd = OrderedDict((f"w.{NAMES[d]}", random_tensor(d, (3, 5), gen)) for d in NAMES)
    ours = roundtrip(sd, tmp_path, fmt)
    assert isinstance(ours, OrderedDict)
    bf = ours["w.BF16"]
    assert bf.raw().dtype == np.uint16 and bf.numpy().dtype == np.float32
    assert ours["w.F16"].numpy().dtype == np.float16 and ours["w.BOOL"].numpy().dtype == np.bool_


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_storage_and_strided_views(tmp_path, fmt):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    half = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)
    obj = {"base": base, "rows": base[1:3], "t": base.t(), "col": base[:, 2], "step": base[::2, ::3],
           "tail": base.view(-1)[5:], "bcast": torch.ones(1, 3).expand(4, 3), "half_t": half.t()[1:, 2:],
           "again": base}
    ours = roundtrip(obj, tmp_path, fmt)
    raw = ours["base"].raw()
    assert isinstance(raw, np.memmap) and not raw.flags.writeable      # contiguous: mapped, not copied
    assert ours["t"].stride == (1, 6) and ours["tail"].storage_offset == 5
    assert ours["base"]._storage is ours["t"]._storage is ours["again"]._storage
    assert ours["bcast"].stride == (0, 1) and ours["bcast"].numpy().shape == (4, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_size_scalars_and_nested_containers(tmp_path, fmt):
    obj = {
        "empty": torch.zeros(0), "empty3": torch.zeros(3, 0, 2, dtype=torch.float16),
        "empty_slice": torch.arange(5)[5:], "scalar": torch.tensor(3.5), "iscalar": torch.tensor(7),
        "bscalar": torch.tensor(1.25, dtype=torch.bfloat16),
        "nested": [torch.ones(2), (torch.zeros(1, dtype=torch.int8), {"x": torch.eye(2)}), []],
        "n": 5, "big": 2**70, "f": 1.5, "s": "text", "none": None, "yes": True, "b": b"\x00\xffbytes",
        "eb": b"", "set": {1, 2}, "fs": frozenset({"a"}), "tup": (1, "a", None), "size": torch.Size([2, 3]),
    }
    ours = roundtrip(obj, tmp_path, fmt)
    assert ours["scalar"].shape == () and ours["scalar"].numpy() == np.float32(3.5)
    assert ours["empty3"].numpy().shape == (3, 0, 2) and ours["empty"].nbytes == 0
    assert ours["size"] == (2, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpt2_state_dict(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    sd = model.state_dict()
    ours = roundtrip(sd, tmp_path, fmt, name="pytorch_model.bin")
    assert set(ours) == set(sd) and "lm_head.weight" in ours
    np.testing.assert_array_equal(ours["lm_head.weight"].numpy(), sd["transformer.wte.weight"].numpy())


def fairseq_checkpoint():
    gen = torch.Generator().manual_seed(1)
    model = OrderedDict([("encoder.embed_tokens.weight", torch.randn(10, 4, generator=gen)),
                         ("decoder.layers.0.fc1.weight", torch.randn(8, 4, generator=gen).half()),
                         ("decoder.version", torch.tensor([3.0]))])
    args = argparse.Namespace(arch="transformer_lm", lr=[0.0005], max_tokens=4096, share_all=True,
                              task="language_modeling", dropout=0.1, seed=1, optimizer=None)
    extra = {"train_iterator": {"epoch": 2, "iterations_in_epoch": 17, "shuffle": True},
             "val_loss": np.float64(3.25), "best": np.int64(9), "mask": np.arange(6, dtype=np.int32).reshape(2, 3),
             "f32": np.float32(0.5), "dt": np.dtype(">i2"), "flag": np.bool_(True)}
    return {"args": args, "model": model, "optimizer_history": [
        {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "FairseqAdam",
         "lr_scheduler_state": {"best": np.float64(2.5)}, "num_updates": 100}],
        "extra_state": extra, "last_optimizer_state": None}


@pytest.mark.parametrize("fmt", FORMATS)
def test_fairseq_namespace_checkpoint(tmp_path, fmt):
    ckpt = fairseq_checkpoint()
    ours = roundtrip(ckpt, tmp_path, fmt, name="checkpoint_best.pt")
    args = ours["args"]
    assert isinstance(args, Inert) and args._type_name == "argparse.Namespace"
    assert args.arch == "transformer_lm" and args["max_tokens"] == 4096 and args.get("nope", 7) == 7
    assert "lr" in args and args.to_dict() == vars(ckpt["args"])
    assert isinstance(ours["extra_state"]["val_loss"], np.float64)
    plain = to_plain(ours)
    assert plain["extra_state"]["mask"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert type(plain["extra_state"]["mask"]) is np.ndarray and plain["extra_state"]["dt"] == np.dtype(">i2")


class LogFormat(enum.Enum):
    json = "json"
    tqdm = "tqdm"


@pytest.fixture
def fake_fairseq(monkeypatch):
    """Dataclasses living in a module named like fairseq's, so OmegaConf.structured pickles them so."""
    mods = {}
    for name in ("fairseq", "fairseq.dataclass", "fairseq.dataclass.configs"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    m = mods["fairseq.dataclass.configs"]

    @dataclass
    class CommonConfig:
        log_format: Optional[LogFormat] = LogFormat.json
        log_interval: int = 100
        seed: int = 1
        tag: str = "???"

    @dataclass
    class OptimizationConfig:
        lr: List[float] = field(default_factory=lambda: [0.25])
        max_epoch: int = 0
        clip_norm: Optional[float] = None

    @dataclass
    class FairseqConfig:
        common: CommonConfig = field(default_factory=CommonConfig)
        optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
        seed_ref: int = "${common.seed}"

    for cls in (CommonConfig, OptimizationConfig, FairseqConfig):
        cls.__module__ = m.__name__
        cls.__qualname__ = cls.__name__
        setattr(m, cls.__name__, cls)
    LogFormat.__module__ = "fairseq.dataclass.configs"
    m.LogFormat = LogFormat
    yield m
    LogFormat.__module__ = __name__


@pytest.mark.parametrize("fmt", FORMATS)
def test_fairseq_omegaconf_checkpoint(tmp_path, fmt, fake_fairseq):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(fake_fairseq.FairseqConfig)
    cfg.common.log_interval = 10
    plain = omegaconf.OmegaConf.create({"model": {"_name": "transformer_lm", "dims": [4, 8], "drop": 0.1,
                                                  "none": None, "ref": "${model.drop}"}})
    model = OrderedDict(w=torch.randn(3, 2))
    path = save({"cfg": cfg, "plain": plain, "model": model, "args": None}, str(tmp_path / "ck.pt"), fmt)
    ours = load_torch_file(path)
    assert_same(ours["model"], model)
    c = ours["cfg"]
    assert isinstance(c, Inert) and c._type_name == "omegaconf.dictconfig.DictConfig"
    assert c.common.log_interval == 10 and c["optimization"]["lr"][0] == 0.25
    want = omegaconf.OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False, enum_to_str=True)
    assert to_plain(c) == want == c.to_dict()
    assert to_plain(ours["plain"]) == omegaconf.OmegaConf.to_container(plain, resolve=False)


# --------------------------------------------------------------------------- malicious corpus


def g(module, name):                                        # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def u(s):                                                   # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def sg(module, name):                                       # STACK_GLOBAL
    return u(module) + u(name) + b"\x93"


def call(fn, *args):                                        # fn(*args) via REDUCE
    return fn + b"(" + b"".join(args) + b"tR"


P2, P4, STOP = b"\x80\x02", b"\x80\x04", b"."


def payloads(canary):
    """{name: (global the refusal must name, pickle)}; each would create `canary` or import a marker."""
    cmd = f"touch {canary}"
    code = f"open({str(canary)!r}, 'w').close()"
    argv = b"(" + u("touch") + u(str(canary)) + b"l"                        # ["touch", canary]
    system = call(g("posix", "system"), u(cmd))
    return {
        "reduce-os.system": ("posix.system", P2 + system + STOP),
        "reduce-os-module": ("os.system", P2 + call(g("os", "system"), u(cmd)) + STOP),
        "reduce-popen": ("subprocess.Popen", P2 + call(g("subprocess", "Popen"), argv) + STOP),
        "reduce-eval": ("builtins.eval", P2 + call(g("builtins", "eval"), u(code)) + STOP),
        "reduce-exec-py2name": ("builtins.exec", P2 + call(g("__builtin__", "exec"), u(code)) + STOP),
        "getattr-chain": ("builtins.getattr", P2 + call(call(g("builtins", "getattr"), call(
            g("builtins", "__import__"), u("os")), u("system")), u(cmd)) + STOP),
        "import-module": ("importlib.import_module", P2 + call(g("importlib", "import_module"), u("this")) + STOP),
        "marker-module": ("refimpl_canary_mod.boom", P2 + call(g("refimpl_canary_mod", "boom")) + STOP),
        "inst": ("os.system", b"(" + u(cmd) + b"ios\nsystem\n" + STOP),
        "obj": ("builtins.exec", P2 + b"(" + g("builtins", "exec") + u(code) + b"o" + STOP),
        "newobj": ("subprocess.Popen", P2 + g("subprocess", "Popen") + b"(" + argv + b"t\x81" + STOP),
        "newobj-ex": ("subprocess.Popen",
                      P4 + sg("subprocess", "Popen") + b")}" + u("args") + u(cmd) + b"s\x92" + STOP),
        "build-setstate": ("subprocess.Popen",
                           P2 + g("subprocess", "Popen") + b")\x81}" + u("args") + u(cmd) + b"sb" + STOP),
        "stack-global": ("os.system", P4 + sg("os", "system") + u(cmd) + b"\x85R" + STOP),
        "stack-global-eval": ("builtins.eval", P4 + sg("builtins", "eval") + u(code) + b"\x85R" + STOP),
        "nested-in-dict": ("posix.system", P2 + b"}(" + u("model") + b"}(" + u("x") + system + b"uu" + STOP),
        "in-allowed-call": ("posix.system", P2 + call(g("collections", "OrderedDict"), system) + STOP),
    }


class Evil:
    """Pickles as a call of `fn(*args)`, the way a hostile checkpoint is made with plain torch.save."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


class EvilNew:
    """Pickles as NEWOBJ of subprocess.Popen (no call) followed by BUILD."""

    __class__ = property(lambda self: subprocess.Popen)   # pickle checks NEWOBJ's class against this

    def __reduce_ex__(self, proto):
        return copyreg.__newobj__, (subprocess.Popen,), {"args": "x"}


@pytest.fixture
def corpus_env(tmp_path, monkeypatch):
    """A canary file path, and a marker module whose import would create it."""
    canary = tmp_path / "canary"
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "refimpl_canary_mod.py").write_text(f"open({str(canary)!r}, 'w').close()\nboom = print\n")
    monkeypatch.syspath_prepend(str(moddir))
    assert "this" not in sys.modules and "refimpl_canary_mod" not in sys.modules
    yield canary
    assert not canary.exists(), "checkpoint code ran"
    assert "this" not in sys.modules and "refimpl_canary_mod" not in sys.modules


def write_zip(path, data_pkl, extra=()):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for name, data in extra:
            z.writestr(f"archive/{name}", data)
        z.writestr("archive/version", "3\n")
    return path


def write_legacy(path, main_pickle, keys=()):
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(main_pickle)
        pickle.dump(list(keys), f, protocol=2)
    return path


def assert_refused(path, global_name):
    with pytest.raises(FormatError) as e:
        load_torch_file(path)
    msg = str(e.value)
    assert f"forbidden global '{global_name}'" in msg and os.path.basename(path) in msg and "\n" not in msg


def test_payloads_are_live(tmp_path):
    """Plain pickle really runs each payload (in a subprocess), so refusing them means something."""
    mods = tmp_path / "mods"
    mods.mkdir()
    dead = []
    for name in payloads("x"):
        canary = tmp_path / f"canary-{name}"
        (mods / "refimpl_canary_mod.py").write_text(f"open({str(canary)!r}, 'w').close()\nboom = print\n")
        data = payloads(canary)[name][1]
        # payloads that only construct (NEWOBJ/BUILD) are live through the import find_class performs
        script = (f"import pickle, sys, time\nsys.path.insert(0, {str(mods)!r})\n"
                  f"try:\n    pickle.loads({data!r})\nexcept Exception:\n    pass\n"
                  f"if 'this' in sys.modules or 'subprocess' in sys.modules: open({str(canary)!r}, 'w').close()\n"
                  "time.sleep(0.05)\n")
        subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
        if not canary.exists():
            dead.append(name)
    assert not dead


@pytest.mark.parametrize("container", ["raw-zip", "legacy", "fairseq-zip", "fairseq-legacy", "hf-bin"])
@pytest.mark.parametrize("name", list(payloads("x")))
def test_malicious_corpus_refused(tmp_path, corpus_env, container, name):
    forbidden, data = payloads(corpus_env)[name]
    path = str(tmp_path / ("pytorch_model.bin" if container == "hf-bin" else "model.pt"))
    if container in ("raw-zip", "hf-bin"):
        write_zip(path, data)
    elif container == "legacy":
        write_legacy(path, data)
    else:
        # a real fairseq-style checkpoint whose extra_state holds the payload after the real tensors
        fmt = container.split("-")[1]
        ck = fairseq_checkpoint()
        ck["extra_state"]["hook"] = "PAYLOAD-SLOT"
        save(ck, path, fmt)
        raw = open(path, "rb").read()
        slot = u("PAYLOAD-SLOT")
        body = data[2:-1] if data.startswith(b"\x80") else data[:-1]
        if fmt == "legacy":
            assert raw.count(slot) == 1
            open(path, "wb").write(raw.replace(slot, body))       # storages follow the pickle, offsets shift with it
        else:
            with zipfile.ZipFile(path) as z:
                items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
            pkl = next(d for n, d in items if n.endswith("/data.pkl"))
            with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
                for n, d in items:
                    z.writestr(n, pkl.replace(slot, body) if n.endswith("/data.pkl") else d)
    assert_refused(path, forbidden)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("protocol", [2, 4])
def test_torch_save_with_hostile_reduce(tmp_path, corpus_env, fmt, protocol):
    """Hostile objects written by torch.save itself, next to real tensors (HF pytorch_model.bin)."""
    import importlib
    cases = {
        "posix.system": Evil(os.system, f"touch {corpus_env}"),
        "builtins.eval": Evil(eval, f"open({str(corpus_env)!r}, 'w').close()"),
        "importlib.import_module": Evil(importlib.import_module, "this"),
        "subprocess.Popen": EvilNew(),
    }
    for forbidden, evil in cases.items():
        sd = OrderedDict(w=torch.ones(2, 2), evil=evil)
        path = str(tmp_path / "pytorch_model.bin")
        save(sd, path, fmt, pickle_protocol=protocol)
        assert_refused(path, forbidden)


def test_extension_opcodes_refused(tmp_path, corpus_env):
    copyreg.add_extension("posix", "system", 0xF1)
    try:
        data = P2 + b"\x82\xf1" + u(f"touch {corpus_env}") + b"\x85R" + STOP
        with pytest.raises(FormatError, match="EXT1"):
            load_torch_file(write_zip(str(tmp_path / "m.pt"), data))
    finally:
        copyreg.remove_extension("posix", "system", 0xF1)


def test_inert_state_is_only_data(tmp_path):
    """BUILD on an allowed stand-in stores hostile-looking state as data; the methods stay ours."""
    state = b"}(" + u("__setstate__") + u("x") + u("get") + u("y") + u("__class__") + u("z") + b"u"
    data = P2 + g("argparse", "Namespace") + b")\x81" + state + b"b" + STOP
    ns = load_torch_file(write_zip(str(tmp_path / "m.pt"), data))
    assert isinstance(ns, Inert) and type(ns).__name__ == "Namespace"
    assert ns["get"] == "y" and ns.get("get") == "y" and ns["__setstate__"] == "x"
    assert to_plain(ns) == {"__setstate__": "x", "get": "y", "__class__": "z"}


def test_codecs_and_numpy_standins_reject_abuse(tmp_path):
    bad = {
        "codec": P2 + call(g("_codecs", "encode"), u("x"), u("rot13")) + STOP,
        "bytes-arg": P2 + call(g("__builtin__", "bytes"), b"J\x00\x00\x00\x40") + STOP,
        "np-object": P2 + call(g("numpy", "dtype"), u("O"), b"\x89\x88") + STOP,
        "reconstruct": P2 + call(g("numpy.core.multiarray", "_reconstruct"), g("builtins", "dict"), b")", u("b"))
        + STOP,
    }
    # BUILD with a (dict, slotstate) pair on the allow-listed objects themselves must not set attributes
    slotstate = b"(N}" + u("__defaults__") + b")" + b"s" + b"tb"
    for name, glob in {"size": g("torch", "Size"), "rebuild": g("torch._utils", "_rebuild_tensor_v2"),
                       "dtype": g("torch", "float32"), "ndarray": g("numpy", "ndarray"),
                       "odict": g("collections", "OrderedDict"), "int": g("builtins", "int")}.items():
        bad[f"build-{name}"] = P2 + glob + slotstate + STOP
    for name, data in bad.items():
        with pytest.raises(FormatError):
            load_torch_file(write_zip(str(tmp_path / f"{name}.pt"), data))
    ok = P2 + call(g("torch", "Size"), b"]K\x02a") + STOP           # the stand-ins still work afterwards
    assert load_torch_file(write_zip(str(tmp_path / "ok.pt"), ok)) == (2,)


def test_pickle_structure_limits(tmp_path):
    """Length fields and memo indices are checked before the unpickler could allocate for them."""
    for name, data in {"memo": P2 + b"]r\xff\xff\xff\x7f" + STOP,
                       "bytes8": P4 + b"\x8e" + struct.pack("<Q", 2**40) + b"abc" + STOP,
                       "unicode8": P4 + b"\x8d" + struct.pack("<Q", 2**62) + STOP,
                       "no-stop": P2 + b"]" * 10,
                       "long-text": b"c" + b"x" * ((1 << 24) + 10)}.items():
        with pytest.raises(FormatError, match="corrupted or truncated pickle"):
            load_torch_file(write_zip(str(tmp_path / f"{name}.pt"), data))
    cyclic = load_torch_file(write_zip(str(tmp_path / "cyc.pt"), P2 + b"]q\x00h\x00a" + STOP))
    assert cyclic[0] is cyclic
    with pytest.raises(FormatError, match="cyclic"):
        to_plain(cyclic)
    n = 200_000
    deep = load_torch_file(write_zip(str(tmp_path / "deep.pt"), P2 + b"]" * n + b"a" * (n - 1) + STOP))
    with pytest.raises(FormatError, match="nested too deeply"):
        to_plain(deep)


def test_pathlib_and_enum_values_become_plain(tmp_path, fake_fairseq):
    import pathlib
    obj = {"save_dir": pathlib.PurePosixPath("/ckpt/run1"), "win": pathlib.PureWindowsPath("C:/x/y"),
           "fmt": LogFormat.tqdm}
    for fmt in FORMATS:
        ours = load_torch_file(save(obj, str(tmp_path / "p.pt"), fmt))
        assert ours["fmt"]._type_name == "fairseq.dataclass.configs.LogFormat"
        assert to_plain(ours) == {"save_dir": "/ckpt/run1", "win": "C:\\x\\y", "fmt": "tqdm"}


# --------------------------------------------------------------------------- corrupt metadata


class FakeStorage:
    def __init__(self, type_name, key, numel, view=None):
        self.type_name, self.key, self.numel, self.view = type_name, key, numel, view


class FakeTensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
    def __init__(self, f, legacy):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            pid = ("storage", getattr(torch, obj.type_name), obj.key, "cpu", obj.numel)
            return pid + (obj.view,) if self.legacy else pid


def craft(path, fmt, tensors, records):
    """A checkpoint with hand-chosen metadata; records = {key: (dtype_size, numel_on_disk)}."""
    buf = io.BytesIO()
    Pickler(buf, fmt == "legacy").dump({k: FakeTensor(*v) for k, v in tensors.items()})
    if fmt == "zip":
        return write_zip(path, buf.getvalue(), [(f"data/{k}", b"\x01" * (sz * n)) for k, (sz, n) in records.items()])
    write_legacy(path, buf.getvalue(), list(records))
    with open(path, "ab") as f:
        for sz, n in records.values():
            f.write(struct.pack("<q", n) + b"\x01" * (sz * n))
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case,match", [
    ("numel-too-big", "bytes|elements|larger than the file"),
    ("offset-past-end", "reaches element"),
    ("size-past-end", "reaches element"),
    ("negative-stride", "non-negative"),
    ("negative-offset", "offset"),
    ("absurd-shape", "reaches element"),
    ("absurd-broadcast", "broadcast tensor"),
    ("shape-stride-mismatch", "sizes and"),
    ("missing-record", "no entry|missing storage record"),
    ("two-dtypes", "two different"),
    ("bad-type", "tuple of non-negative"),
])
def test_corrupt_metadata(tmp_path, fmt, case, match):
    s = FakeStorage("FloatStorage", "0", 6)
    rec = {"0": (4, 6)}
    t = {"ok": (s, 0, (2, 3), (3, 1))}
    if case == "numel-too-big":
        t["x"] = (FakeStorage("FloatStorage", "1", 2**40), 0, (2,), (1,))
        rec["1"] = (4, 2)
    elif case == "offset-past-end":
        t["x"] = (s, 5, (2,), (1,))
    elif case == "size-past-end":
        t["x"] = (s, 0, (7,), (1,))
    elif case == "negative-stride":
        t["x"] = (s, 5, (2,), (-1,))
    elif case == "negative-offset":
        t["x"] = (s, -1, (1,), (1,))
    elif case == "absurd-shape":
        t["x"] = (s, 0, (2**60, 2**60), (1, 1))
    elif case == "absurd-broadcast":
        t["x"] = (s, 0, (2**60,), (0,))
    elif case == "shape-stride-mismatch":
        t["x"] = (s, 0, (2, 3), (1,))
    elif case == "missing-record":
        t["x"] = (FakeStorage("FloatStorage", "9", 1), 0, (1,), (1,))
    elif case == "two-dtypes":
        t["x"] = (FakeStorage("HalfStorage", "0", 12), 0, (1,), (1,))
    elif case == "bad-type":
        t["x"] = (s, 0, (2.5,), (1,))
    path = craft(str(tmp_path / "bad.pt"), fmt, t, rec)
    with pytest.raises(FormatError, match=match):
        load_torch_file(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_valid_file_matches(tmp_path, fmt):
    s = FakeStorage("FloatStorage", "0", 6)
    path = craft(str(tmp_path / "ok.pt"), fmt, {"a": (s, 1, (2, 2), (2, 1)), "b": (s, 0, (3,), (0,))}, {"0": (4, 6)})
    assert_same(load_torch_file(path), oracle(path))


def test_legacy_storage_views(tmp_path):
    """Pre-0.4 files could hold storage views: ('storage', type, root, loc, numel, (view_key, offset, size))."""
    root = FakeStorage("FloatStorage", "0", 8)
    view = FakeStorage("FloatStorage", "0", 8, view=("v1", 2, 4))
    path = craft(str(tmp_path / "views.pt"), "legacy", {"whole": (root, 0, (8,), (1,)), "view": (view, 1, (3,), (1,))},
                 {"0": (4, 8)})
    with open(path, "r+b") as f:        # give the storage distinct values
        data = f.read()
        f.seek(len(data) - 32)
        f.write(np.arange(8, dtype="<f4").tobytes())
    ours = load_torch_file(path)
    assert_same(ours, oracle(path))
    assert ours["view"].numpy().tolist() == [3.0, 4.0, 5.0]
    bad = FakeStorage("FloatStorage", "0", 8, view=("v1", 6, 4))
    path = craft(str(tmp_path / "badview.pt"), "legacy", {"view": (bad, 0, (1,), (1,))}, {"0": (4, 8)})
    with pytest.raises(FormatError, match="storage view"):
        load_torch_file(path)


def test_big_endian_zip(tmp_path):
    """A zip written on a big-endian machine (byteorder 'big'): torch byte-swaps on load, so do we."""
    gen = torch.Generator().manual_seed(3)
    obj = {"f": torch.randn(3, 4, generator=gen), "l": torch.arange(5), "h": torch.randn(4, generator=gen).bfloat16(),
           "u": torch.arange(3, dtype=torch.uint8), "d": torch.randn(2, generator=gen).double()}
    src = save(obj, str(tmp_path / "le.pt"), "zip")
    sizes = [t.element_size() for t in obj.values()]       # storage keys are "0", "1", ... in this order
    with zipfile.ZipFile(src) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    dst = str(tmp_path / "be.pt")
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n, d in items:
            if n.endswith("/byteorder"):
                d = b"big"
            elif "/data/" in n:
                size = sizes[int(n.rsplit("/", 1)[1])]
                d = np.frombuffer(d, f"<u{size}").byteswap().tobytes()
            z.writestr(n, d)
    ours = load_torch_file(dst)
    assert_same(ours, obj)
    assert_same(ours, oracle(dst))


def test_parameters_dtypes_devices_and_bare_tensor(tmp_path):
    for fmt in FORMATS:
        ours = roundtrip({"p": torch.nn.Parameter(torch.ones(2, 2)), "b": [torch.nn.Parameter(torch.zeros(1))]},
                         tmp_path, fmt)
        assert ours["p"].shape == (2, 2)
        ours = load_torch_file(save({"dtype": torch.float16, "device": torch.device("cpu"),
                                     "cuda": torch.device("cuda", 1)}, str(tmp_path / "d.pt"), fmt))
        assert ours["dtype"].name == "float16" and ours["device"] == "cpu" and ours["cuda"] == "cuda:1"
        t = load_torch_file(save(torch.arange(4.0), str(tmp_path / "t.pt"), fmt))
        assert isinstance(t, LazyTensor) and t.numpy().tolist() == [0.0, 1.0, 2.0, 3.0]
        assert np.asarray(t).dtype == np.float32


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # torch.jit.script / torch.jit.save
def test_compressed_and_not_checkpoint_files(tmp_path):
    src = save({"w": torch.ones(3)}, str(tmp_path / "a.pt"), "zip")
    with zipfile.ZipFile(src) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(tmp_path / "c.pt", "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in items:
            z.writestr(n, d)
    with pytest.raises(FormatError, match="compressed"):
        load_torch_file(tmp_path / "c.pt")
    for name, data in {"empty.pt": b"", "text.pt": b"hello world\n", "st.pt": b"\x08" + b"\x00" * 7 + b"{}",
                       "pickle.pt": pickle.dumps({"a": 1}, protocol=2)}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(FormatError, match="not a PyTorch checkpoint|empty"):
            load_torch_file(tmp_path / name)
    with pytest.raises(FormatError, match="cannot read"):
        load_torch_file(tmp_path / "missing.pt")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
    with pytest.raises(FormatError, match="TorchScript"):
        load_torch_file(tmp_path / "ts.pt")


# --------------------------------------------------------------------------- truncation and fuzzing


def small_files(tmp_dir):
    obj = OrderedDict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.tensor([1.5, -2.0]).bfloat16())
    obj["t"] = obj["a"].t()
    return {fmt: open(save(obj, os.path.join(tmp_dir, f"small-{fmt}.pt"), fmt), "rb").read() for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_truncation_is_a_format_error(tmp_path, fmt):
    data = small_files(str(tmp_path))[fmt]
    path = tmp_path / "cut.pt"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError):
            load_torch_file(path)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    return str(d), small_files(str(d))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(FORMATS), edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                                st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_mutations_give_format_error_or_torch_result(fuzz_dir, fmt, edits, cut):
    d, files = fuzz_dir
    data = bytearray(files[fmt])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = os.path.join(d, "mutant.pt")
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        ours = load_torch_file(path)
    except FormatError as e:
        assert "\n" not in str(e)
        return
    ref = oracle(path)          # if we accept a file, torch must accept it and agree
    assert_same(ours, ref)
