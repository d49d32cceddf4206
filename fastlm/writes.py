"""Failed writes (disk full, a file-size limit, a quota): told apart from other errors, naming the file and errno.

Writers build their output under a temporary name (fastlm.store.temp_dir_beside); when a write there fails
they remove it and raise WriteFailed, so a full disk gives one line naming the file, never a traceback from
whichever library was writing (tokenizers' Rust `Exception: File too large (os error 27)`) or a bare
`[Errno 27] File too large` that names no file.
"""
import errno
import os
import re
import resource
import shutil
from pathlib import Path

WRITE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteFailed(OSError):
    """An output file could not be written; the writer removed what it had made of the output."""

    def __str__(self):
        return (f"cannot write {self.filename}: {self.strerror} (errno {self.errno}); nothing was written (free space "
                "there, or raise the file-size limit: ulimit -f)")


def write_failed(code, path):
    return WriteFailed(code, os.strerror(code), str(path))


def failed_write(error, directory):
    """(file, errno) when ``error`` is a failed write under ``directory``, else None (some other error).

    An OSError carries its errno (shutil.copytree's Error lists each file's); tokenizers' and safetensors'
    (Rust) errors say `(os error N)`; torch.save's `RuntimeError: [enforce fail at inline_container.cc]` says
    neither: then the errno is found from the file-size limit or the free space that stopped it. The file is
    the OSError's, else the one the innermost writing call of the traceback was given, else the one under
    ``directory`` written last."""
    directory = Path(directory)
    path, code = None, None
    if isinstance(error, shutil.Error) and error.args and isinstance(error.args[0], list):
        for _, destination, why in error.args[0]:
            found = re.search(r"\[Errno (\d+)\]", str(why))
            if found and int(found.group(1)) in WRITE_ERRNOS:
                path, code = Path(destination), int(found.group(1))
                break
    elif isinstance(error, OSError):
        code = error.errno
        path = Path(error.filename) if isinstance(error.filename, (str, os.PathLike)) else None
    else:
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
    if path is None or not _inside(path, directory):
        path = _file_being_written(error, directory)
    if code not in WRITE_ERRNOS:
        if not isinstance(error, RuntimeError):
            return None
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if path is not None and path.is_file() and limit != resource.RLIM_INFINITY and path.stat().st_size >= limit:
            code = errno.EFBIG
        elif path is not None and shutil.disk_usage(directory).free < 1 << 20:
            code = errno.ENOSPC
        else:
            return None
    return path or directory, code


def _inside(path, directory):
    return os.fspath(path).startswith(f"{directory}{os.sep}")


def _file_being_written(error, directory):
    """The innermost path under ``directory`` among the arguments of the error's traceback frames, else the
    file under it written last, else None."""
    path = None
    frame = error.__traceback__
    while frame is not None:
        for value in frame.tb_frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and _inside(value, directory):
                path = Path(value)
        frame = frame.tb_next
    if path is not None:
        return path
    files = [p for p in directory.rglob("*") if p.is_file()] if directory.is_dir() else []
    return max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
