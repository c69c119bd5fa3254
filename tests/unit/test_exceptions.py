"""Every exception class mmdc defines survives pickle (how Ray carries it from an actor to ``mmdc.run``), message,
type and fields intact: Ray rebuilds an exception with ``cls(*args)``, which fails for one whose ``__init__`` takes
other arguments than its message, and the user then sees a TypeError instead of the reason."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest

import mmdc

OPTIONAL = ("vllm", "open_clip", "spacy", "deepspeed")  # extras a module may need; it is then skipped here


def mmdc_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(mmdc.__path__, "mmdc.") if not m.name.endswith("__main__"))


def exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for name in mmdc_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            if any(extra in str(err) for extra in OPTIONAL):
                continue
            raise
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[key] for key in sorted(found)]


def example(cls: type[BaseException]) -> BaseException:
    """An instance made from the constructor's own parameters: a number for int-like names, else a string."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
    args = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        hint = str(p.annotation)
        if "int" in hint or "float" in hint:
            args.append(7)
        elif "Sequence" in hint or "list" in hint:
            args.append(["a", "b"])
        else:
            args.append(f"<{p.name}>")
    return cls(*args)


CLASSES = exception_classes()


def test_the_walk_finds_the_classes_that_cross_ray():
    names = {cls.__name__ for cls in CLASSES}
    assert {"ImageError", "LlavaFormatError", "ConfigError", "TooMuchBadInput", "RunLocked", "LockLost"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_round_trips_through_pickle(cls):
    err = example(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.args == err.args
    assert vars(back) == vars(err)
