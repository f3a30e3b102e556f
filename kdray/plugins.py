"""A user's own losses and datasets: Python files or modules named in a job's `plugins:` list.

    plugins: [my_losses.py, mylab.kd_losses]       # a file (relative to the working directory) or a module

Importing a plugin runs its `@register_loss` / `@register_dataset` decorators; from then on its loss is a
`losses.<name>` section like a built-in one (options, overrides, search-space keys, report labels). kdray imports
the plugins a job names before it reads the rest of the job, on the driver and again on every Ray worker:

- a file is imported under a module name made from its path and a digest of its text
  (`kdray_plugin_<stem>_<digest>`), so importing it twice is a no-op and every process agrees on the name;
- its text travels with the trial (`plugin_sources`), so a worker on a node without the file imports the
  very text the driver validated (a cluster needs no copy of the user's files);
- a module name is imported with `importlib.import_module`; it must be installed wherever the trials run.

A plugin that cannot be imported stops the command before any compute with one line (ConfigError): the file
or module, and the error with its line number.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import tempfile
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from kdray.errors import ConfigError


def is_file_entry(entry: str) -> bool:
    """A plugin entry names a file when it ends in `.py` or holds a path separator; otherwise a module."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def resolve_entries(entries: Sequence[str], base: Path | None = None) -> tuple[str, ...]:
    """The entries with each file made absolute against `base` (the working directory); ConfigError for an
    entry that is not a non-empty string."""
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise ConfigError(f"plugins: got {entries!r}; expected a list of Python files or module names")
    base = base or Path.cwd()
    resolved = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"plugins[{i}]: got {entry!r}; expected a Python file (my_loss.py) or a module name")
        entry = entry.strip()
        if is_file_entry(entry):
            path = Path(entry).expanduser()
            entry = str(path if path.is_absolute() else (base / path).resolve())
        resolved.append(entry)
    return tuple(resolved)


_IMPORTED: dict[str, str] = {}  # file entry -> the text this process imported for it


def read_sources(entries: Sequence[str]) -> dict[str, str]:
    """`{file: text}` of the file entries (already resolved), to ship with the trials: the text this process
    imported (a worker re-ships what it was sent), else the file's; ConfigError for a file that cannot be read."""
    return {entry: _IMPORTED.get(entry) or _read(Path(entry)) for entry in entries if is_file_entry(entry)}


def import_plugins(entries: Sequence[str], sources: Mapping[str, str] | None = None) -> None:
    """Import every plugin (entries already resolved); a file missing here is imported from `sources` when
    they hold its text. ConfigError naming the plugin and the error when one fails."""
    for entry in entries:
        before = _registered()
        if is_file_entry(entry):
            path = Path(entry)
            text = sources[entry] if sources and entry in sources and not path.is_file() else _read(path)
            fresh = module_name(path, text) not in sys.modules
            _import_file(path, text)
            _IMPORTED[entry] = text
        else:
            fresh = entry not in sys.modules
            _import_module(entry)
        if fresh and _registered() == before:
            raise ConfigError(f"plugins: {entry}: registered no loss and no dataset (kdray.losses.register_loss, "
                              "kdray.data.register_dataset)")


def load_plugins(*entries: str) -> tuple[str, ...]:
    """Import plugins as a job that names them does (files relative to the working directory), for a test or
    a notebook: `load_plugins("my_loss.py")`, then `check_loss("my_loss")`. Returns the resolved entries."""
    resolved = resolve_entries(list(entries))
    import_plugins(resolved)
    return resolved


def _registered() -> set[str]:
    from kdray.data.registry import DATASETS
    from kdray.losses.registry import LOSSES

    return {*(f"loss {n}" for n in LOSSES), *(f"dataset {n}" for n in DATASETS)}


def _read(path: Path) -> str:
    if path.is_dir():
        raise ConfigError(f"plugins: {path}: a folder; name the Python file (my_loss.py) or an importable module")
    if not path.is_file():
        raise ConfigError(f"plugins: {path}: no such file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"plugins: {path}: cannot be read ({err})") from None


def module_name(path: Path, text: str) -> str:
    """`kdray_plugin_<stem>_<digest of path and text>`: the same in every process that imports this text."""
    digest = hashlib.sha256(f"{path}\0{text}".encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"kdray_plugin_{stem}_{digest}"


def _import_file(path: Path, text: str) -> None:
    name = module_name(path, text)
    if name in sys.modules:
        return
    origin = path
    if not path.is_file() or path.read_text() != text:  # a worker without the file (or with another version)
        origin = Path(tempfile.mkdtemp(prefix="kdray-plugin-")) / path.name
        origin.write_text(text)
    spec = importlib.util.spec_from_file_location(name, origin)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugins: {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise ConfigError(f"plugins: {path}: {_describe(err, str(origin))}") from None


def _import_module(name: str) -> None:
    try:
        importlib.import_module(name)
    except Exception as err:
        raise ConfigError(f"plugins: module {name}: {_describe(err, None)}") from None


def _describe(err: Exception, origin: str | None) -> str:
    """`SyntaxError: invalid syntax (line 3)` / `NameError: name 'x' is not defined (line 12)`: the error and
    the line of the plugin's own code it came from."""
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} (line {err.lineno})"
    where = ""
    for frame in traceback.extract_tb(err.__traceback__):
        if frame.filename == origin or (origin is None and not frame.filename.startswith("<frozen")
                                         and frame.filename not in (__file__, importlib.__file__)):
            where = f" (line {frame.lineno})" if origin is not None else f" ({frame.filename}, line {frame.lineno})"
    return f"{type(err).__name__}: {err}{where}"
