"""Methods and evaluations registered from outside mimbench: a user's own file or package,
imported before a suite is planned, so that nothing in the checkout is edited.

Three ways in, loaded in this order (a module named twice is imported once):

    entry points     an installed package declares its module in the `mimbench.plugins` group:
                         [project.entry-points."mimbench.plugins"]
                         my_methods = "my_package.methods"
    MIMBENCH_PLUGINS modules or .py files, separated by os.pathsep (":" here), for every
                     command of the process (and of the processes it starts)
    --plugins        a module or a .py file, repeatable (`python -m suites.run ... --plugins my_method.py`)

A module is imported by name; a .py file under a name derived from its file name
(`my_method.py` -> `mimbench_plugin_my_method`). Importing it runs its `@register_method` /
`@register_evaluation` decorators. Whatever fails on the way is one line naming the plugin
(`PluginError`, a ConfigError: the command line exits 2).

`loaded` keeps, per plugin, what it registered and which code it was: its distribution's
version and its file's sha256. Every run record of the process states them
(`runs.execute.provenance`); no run's name does (a run's identity is its resolved config, as for
the project's own methods).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError
from eval.registry import registry as evaluations
from methods.registry import registry as methods

ENV = "MIMBENCH_PLUGINS"
ENTRY_POINT_GROUP = "mimbench.plugins"
FILE_MODULE_PREFIX = "mimbench_plugin_"     # the module name a plugin file is imported under


class PluginError(ConfigError):
    """A plugin that cannot be found or imported; the message names it and the fix."""


@dataclass(frozen=True)
class Plugin:
    """One imported plugin and what it registered."""
    module: str                         # the name it is imported under
    given: str                          # as the user named it: "my_method.py", "my_package.methods"
    via: str                            # "--plugins", "MIMBENCH_PLUGINS" or "entry point 'x' (my-dist 1.0)"
    file: str | None                    # its source file
    version: str | None                 # its installed distribution's version (None: not installed)
    sha256: str | None                  # of its source file
    methods: tuple[str, ...]            # the methods it registered
    evaluations: tuple[str, ...]        # the evaluations it registered

    def record(self) -> dict:
        """What a run record keeps of it (`provenance()["plugins"]`)."""
        return {"module": self.module, "given": self.given, "via": self.via, "file": self.file, "version": self.version,
                "sha256": self.sha256, "methods": list(self.methods), "evaluations": list(self.evaluations)}


loaded: dict[str, Plugin] = {}      # module name -> the plugin, in the order imported


def load_plugins(given: list[str] | tuple[str, ...] = ()) -> list[Plugin]:
    """Import the installed entry points, then $MIMBENCH_PLUGINS, then `given` (--plugins);
    each once per process. The plugins of all three, in that order."""
    plugins = []
    for entry in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = entry.dist
        where = f"entry point {entry.name!r} of {dist.name if dist else 'an unnamed distribution'}"
        plugins.append(load_plugin(entry.module, where, dist.version if dist else None))
    plugins += [load_plugin(word.strip(), ENV) for word in os.environ.get(ENV, "").split(os.pathsep) if word.strip()]
    return plugins + [load_plugin(word.strip(), "--plugins") for word in given]


def load_plugin(name: str, where: str, version: str | None = None) -> Plugin:
    """Import one plugin (`name`: a module or a .py file; `where`: how it was given, for messages;
    `version`: its distribution's, when known)."""
    if not name:
        raise PluginError(f"plugin {name!r} ({where}) names nothing; pass a module or a path to a .py file")
    is_file = name.endswith(".py") or os.sep in name or "/" in name
    module_name = file_module_name(name, where) if is_file else name
    if module_name in loaded:
        return loaded[module_name]
    before_methods, before_evaluations = set(methods), set(evaluations)
    module = import_file(name, module_name, where) if is_file else import_module(name, where)
    file = getattr(module, "__file__", None)
    plugin = Plugin(module=module_name, given=name, via=where,
                    file=str(Path(file).resolve()) if file else None, version=version or version_of(module_name),
                    sha256=file_sha256(file),
                    methods=registered_by(module_name, before_methods, methods, lambda value: value[0]),
                    evaluations=registered_by(module_name, before_evaluations, evaluations, lambda value: value.run))
    loaded[module_name] = plugin
    return plugin


def file_module_name(path: str, where: str) -> str:
    """`my-method.py` -> `mimbench_plugin_my_method`; two files of one name cannot both be loaded."""
    file = Path(path).expanduser()
    if file.suffix != ".py" or not file.is_file():
        problem = "is not a .py file" if file.exists() else "not found"
        raise PluginError(f"plugin {path!r} ({where}): {problem}; pass a .py file or an importable module name")
    module_name = FILE_MODULE_PREFIX + re.sub(r"\W", "_", file.stem)
    other = getattr(sys.modules.get(module_name), "__file__", None)
    if other is not None and Path(other).resolve() != file.resolve():
        raise PluginError(f"plugin {path!r} ({where}): another plugin file of the same name, {other}, is "
                          f"loaded as {module_name}; rename one of the two files")
    return module_name


def import_file(path: str, module_name: str, where: str):
    """Import a .py file as `module_name` (kept in sys.modules, so its classes pickle by name)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, Path(path).expanduser())
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise PluginError(f"plugin {path!r} ({where}) failed to import: {failure(err)}") from None
    return module


def import_module(name: str, where: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            raise PluginError(f"plugin {name!r} ({where}): no module named {err.name!r}; pass an importable "
                              f"module name (installed, or on PYTHONPATH) or a path to a .py file") from None
        raise PluginError(f"plugin {name!r} ({where}) failed to import: {failure(err)}") from None
    except Exception as err:
        raise PluginError(f"plugin {name!r} ({where}) failed to import: {failure(err)}") from None


def failure(err: BaseException) -> str:
    """The error as one line, with the line of the plugin's own code that raised it (else the
    last line that did: mimbench's, when the plugin called it wrongly)."""
    message = " ".join(str(err).split()) or "(no message)"
    frames = [frame for frame in traceback.extract_tb(err.__traceback__)
              if "importlib" not in frame.filename and Path(frame.filename).resolve() != Path(__file__).resolve()]
    theirs = [frame for frame in frames if not in_project(frame.filename)]
    frame = (theirs or frames or [None])[-1]
    at = f" (at {Path(frame.filename).name}:{frame.lineno})" if frame is not None else ""
    return f"{type(err).__name__}: {message}{at}"


def in_project(filename: str) -> bool:
    """Whether a source file is one of mimbench's packages (the folders beside runs/)."""
    path, root = Path(filename).resolve(), Path(__file__).resolve().parents[1]
    return path.is_relative_to(root) and len(path.relative_to(root).parts) > 1 \
        and (root / path.relative_to(root).parts[0] / "__init__.py").is_file()


def registered_by(module_name: str, before: set[str], registry: dict, defined_by) -> tuple[str, ...]:
    """The names the plugin registered: new since its import, or (imported before) defined in it."""
    def in_module(value) -> bool:
        owner = getattr(defined_by(value), "__module__", "") or ""
        return owner == module_name or owner.startswith(module_name + ".")

    return tuple(name for name, value in registry.items() if name not in before or in_module(value))


def version_of(module_name: str) -> str | None:
    """The version of the installed distribution that provides the module (None: none does)."""
    top = module_name.split(".")[0]
    for dist in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def file_sha256(file: str | None) -> str | None:
    if not file or not Path(file).is_file():
        return None
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()


def plugin_of(module_name: str) -> Plugin | None:
    """The loaded plugin a module belongs to (None: none)."""
    for name, plugin in loaded.items():
        if module_name == name or module_name.startswith(name + "."):
            return plugin
    return None


def records() -> list[dict]:
    """Every loaded plugin as the run record keeps it."""
    return [plugin.record() for plugin in loaded.values()]
