"""Read a PyTorch zip checkpoint (``torch.save``, any ``pickle_module``, e.g. dill) without running
anything from it.

A pickle is a program: every ``GLOBAL`` it names is imported and may be called. This reader maps
the few globals a diffusion_policy workspace checkpoint needs to inert stand-ins defined here, and
refuses every other one *before* anything is called, naming it. Tensors are rebuilt from the
archive's storage files with ``torch.frombuffer``; OmegaConf containers become plain dicts and
lists; ``dill``'s ``_load_type`` becomes a name; nested pickled bytes (the ``pickles`` entry) stay
bytes and are never unpickled. Neither ``dill``, ``omegaconf`` nor ``diffusion_policy`` is imported.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class UnsafePickleError(ValueError):
    """The file's pickle names a global outside the allow-list (it could run code)."""


class _Record:
    """Stand-in for an object rebuilt with NEWOBJ + BUILD: keeps the class name and the state."""

    cls_name = "object"

    def __init__(self, *args):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


def _record_type(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_Record,), {"cls_name": name})


class TypeRef(str):
    """What ``dill._dill._load_type(name)`` would return, kept as its name."""


class _AnySentinel:
    def __repr__(self) -> str:
        return "typing.Any"


ANY = _AnySentinel()
OMEGACONF_CLASSES = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
                     "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
                     "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode")
_RECORDS = {name: _record_type(name) for name in OMEGACONF_CLASSES}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.Tensor):
        raise UnsafePickleError("a tensor was rebuilt from something that is not a storage of this archive")
    if len(size) == 0:
        return storage[offset].clone()
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


def _defaultdict(*args):
    return {}


ALLOWED = {
    "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": _defaultdict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "_codecs.encode": _encode,
    "typing.Any": ANY,
    "dill._dill._load_type": TypeRef,
    **{f"torch.{name}": _StorageType(name) for name in STORAGE_DTYPES},
    # a plain pickle names builtin types directly (OmegaConf's object_type): kept as names
    **{f"{mod}.{name}": TypeRef(name) for mod in ("builtins", "__builtin__")
       for name in ("dict", "list", "tuple", "set", "int", "long", "float", "str", "unicode", "bool", "bytes", "object")},
    **_RECORDS,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._zip, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        key = f"{module}.{name}"
        if key not in ALLOWED:
            raise UnsafePickleError(f"the checkpoint's pickle names {key!r}, which could run code; refusing to load it "
                                    f"(allowed: data containers, tensors and OmegaConf configs)")
        return ALLOWED[key]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"unsupported persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid[:5]
        if key not in self._storages:
            raw = self._zip.read(f"{self._prefix}data/{key}")
            t = torch.frombuffer(bytearray(raw), dtype=stype.dtype) if raw else torch.empty(0, dtype=stype.dtype)
            if self._byteorder != "little" and t.element_size() > 1:
                raise UnsafePickleError("big-endian checkpoints are not supported")
            self._storages[key] = t[:numel] if numel <= t.numel() else t
        return self._storages[key]


def read_torch_zip(path: str | Path):
    """The object a ``torch.save``d zip file holds, with inert stand-ins (see the module docstring)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a PyTorch zip checkpoint (legacy non-zip torch.save files are not supported)")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint (no <name>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        names = set(archive.namelist())
        byteorder = archive.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        return _RestrictedUnpickler(archive.read(pkl[0]), archive, prefix, byteorder).load()


def to_plain(obj):
    """OmegaConf stand-ins → plain dicts, lists and values (resolving no interpolation)."""
    if isinstance(obj, _Record):
        state = getattr(obj, "state", None)
        state = state if isinstance(state, dict) else {}
        if obj.cls_name.endswith("DictConfig"):
            content = state.get("_content")
            return None if content is None else {k: to_plain(v) for k, v in content.items()}
        if obj.cls_name.endswith("ListConfig"):
            content = state.get("_content")
            return None if content is None else [to_plain(v) for v in content]
        if "_val" in state:
            return to_plain(state["_val"])
        return None
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
