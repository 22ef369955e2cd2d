"""torch.hub entry points: one per zoo model.

    torch.hub.load("<path to this repo>", "mobilenet_v2", source="local", pretrained=True)

`pretrained=True` loads the shipped CIFAR-10 weights (see `models.list_pretrained()`), `tag=`
picks among several entries of one model (`tag="w0_5"` for "mobilenet_v2.w0_5"); other
keyword arguments go to `models.create_model` (num_classes, in_chans, drop_rate, features_only,
checkpoint_path, width, stem, ...).

The zoo package is loaded by file path, not with `import models`: a caller may already have
imported another module called `models` (many projects have one), which `import models` would
silently pick up. When `models` in `sys.modules` is this repository's package it is used as is;
otherwise this repository's `models/` is loaded under a private name.
"""

dependencies = ["torch", "safetensors"]

import importlib.util  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_DIR = os.path.join(_HERE, "models")
_PRIVATE_NAME = "_pointwise_zoo_hub_models"


def _is_ours(module) -> bool:
    file = getattr(module, "__file__", None)
    return bool(file) and os.path.realpath(os.path.dirname(file)) == os.path.realpath(_PACKAGE_DIR)


def _load_zoo():
    for name in ("models", _PRIVATE_NAME):
        module = sys.modules.get(name)
        if module is not None and _is_ours(module):
            return module
    spec = importlib.util.spec_from_file_location(
        _PRIVATE_NAME, os.path.join(_PACKAGE_DIR, "__init__.py"), submodule_search_locations=[_PACKAGE_DIR]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_PRIVATE_NAME] = module  # the package's relative imports resolve against this name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == _PRIVATE_NAME or k.startswith(_PRIVATE_NAME + ".")]:
            del sys.modules[key]
        raise
    return module


_models = _load_zoo()


def _entrypoint(name):
    def load(pretrained: bool = False, tag: str | None = None, **kwargs):
        # `tag` picks one of several shipped entries, e.g. tag="w0_5" -> "mobilenet_v2.w0_5"
        return _models.create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)

    load.__name__ = name
    load.__doc__ = f"Zoo model {name!r}; pretrained=True loads its shipped CIFAR-10 weights."
    return load


for _name in _models.list_models():
    globals()[_name] = _entrypoint(_name)
