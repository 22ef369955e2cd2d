"""torch.hub entry points: one per zoo model.

    torch.hub.load("<path to this repo>", "mobilenet_v2", source="local", pretrained=True)

`pretrained=True` loads the shipped CIFAR-10 weights (see `models.list_pretrained()`), `tag=`
picks among several entries of one model (`tag="w0_5"` for "mobilenet_v2.w0_5"); other
keyword arguments go to `models.create_model`.
"""

dependencies = ["torch", "safetensors"]

import models as _models  # noqa: E402


def _entrypoint(name):
    def load(pretrained: bool = False, tag: str | None = None, **kwargs):
        # `tag` picks one of several shipped entries, e.g. tag="w0_5" -> "mobilenet_v2.w0_5"
        return _models.create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)

    load.__name__ = name
    load.__doc__ = f"Zoo model {name!r}; pretrained=True loads its shipped CIFAR-10 weights."
    return load


for _name in _models.list_models():
    globals()[_name] = _entrypoint(_name)
