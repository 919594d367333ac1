"""Image lists (`path,label,domain` per line) and the ILIAS id encoding of their paths.

A list line is either `path` alone or `path,label,domain`, with `label` and `domain`
integers; `path` is relative to the dataset folder. Blank lines are skipped, a UTF-8
byte-order mark and Windows line endings are accepted. Paths cannot contain commas.

HDF5 files written by the ILIAS tools store each path as an ASCII id: every character
outside ASCII becomes `#U` followed by four lowercase hex digits of its code point.
"""
import hashlib
import io
import os
import posixpath
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

_ESCAPED_CHAR = re.compile(r"#U([0-9a-f]{4})")
# ASCII control characters, and a drive letter that makes a Windows path absolute
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")


class ImageListError(ValueError):
    """A list file that cannot be used as it is: the message names the line and the fix."""


@dataclass(frozen=True)
class ListEntry:
    path: str
    label: int | None
    domain: int | None
    line_no: int


def escape_id(path: str) -> str:
    """Encode a path as the ASCII id the ILIAS extractor stores in HDF5 `index`.

    Same transformation as the ILIAS extractor (the repr of the `unicode-escape` bytes,
    with `\\u` and `\\x` turned into `#U` and `#U00`), so ids of both tools match exactly,
    including its rare oddities: a backslash becomes four, characters above U+FFFF keep
    the form `\\\\U0001f600`, and `'` becomes `\\'` in a path that also contains `"`.
    """
    escaped = repr(path.encode("unicode-escape"))[2:-1]
    return escaped.replace("\\\\u", "#U").replace("\\\\x", "#U00")


def unescape_id(image_id: str) -> str:
    """Decode the `#Uxxxx` sequences of an id back to characters.

    NOTE: a path that literally contains `#U` plus four hex digits cannot be distinguished
    from an escaped one; such paths do not occur in UnED or ILIAS.
    """
    return _ESCAPED_CHAR.sub(lambda m: chr(int(m.group(1), 16)), image_id)


def canonical_id(image_id: str) -> str:
    """Map an HDF5 id to its escaped form, whether the writer escaped it or not."""
    return image_id if image_id.isascii() else escape_id(image_id)


def paths_sha256(entries: list[ListEntry]) -> str:
    """Return the hex SHA-256 of the entries' paths in list order.

    It does not depend on how the file is laid out (line endings, blank lines, a byte-order
    mark, spaces around fields) or on the labels and domains, which extraction does not use.
    Paths contain no newline, so the joined text is unambiguous.
    """
    return hashlib.sha256("\n".join(entry.path for entry in entries).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_relative(path: str, list_path: str, line_no: int) -> None:
    # string tests rather than PurePosixPath, which took most of the time of reading a long list
    if path.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(path):
        raise ImageListError(
            f"{list_path}:{line_no}: absolute path {path!r} is not allowed; "
            "write paths relative to the image folder (extract.py's --dataset_dir)"
        )
    if ".." in path.split("/") or ".." in path.split("\\"):
        raise ImageListError(
            f"{list_path}:{line_no}: path {path!r} contains '..' and could leave the image folder; "
            "write paths relative to that folder (extract.py's --dataset_dir) without '..'"
        )


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ASCII digits only: int() also reads "1_0", and "10" in Arabic-Indic or full-width digits,
# as 10, which would silently put such a label into class 10
_DECIMAL_INT = re.compile(r"[+-]?[0-9]+")


# the first 8 bytes of an HDF5 file that starts at offset 0, as h5py writes it
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _parse_int(value: str, field: str, list_path: str, line_no: int) -> int:
    if not _DECIMAL_INT.fullmatch(value.strip()):
        raise ImageListError(
            f"{list_path}:{line_no}: {field} {value!r} is not an integer in ASCII digits (such as 12 or -3); "
            "each line must be 'path,label,domain' with integer label and domain"
        )
    number = int(value)
    # labels and domains are stored as int64 arrays
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise ImageListError(
            f"{list_path}:{line_no}: {field} {value!r} does not fit in a 64-bit integer; "
            "renumber the labels and domains"
        )
    return number


def read_list_text(list_path: str) -> str:
    """Return the list file decoded as UTF-8 without a byte-order mark, or raise naming the bad line."""
    try:
        with open(list_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageListError(f"cannot read the list {list_path!r}: {e.strerror or e}; check the path") from e
    # the list and embedding flags sit side by side, so swapping them is an easy mistake
    if data.startswith(HDF5_SIGNATURE):
        raise ImageListError(
            f"{list_path!r} is an HDF5 file, not a list of 'path,label,domain' lines; check that the list "
            "flag names the list and the embeddings flag the HDF5 file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise ImageListError(
            f"{list_path}:{line_no}: invalid UTF-8 (byte {data[e.start]:#04x}); save the list as UTF-8"
        ) from None


def read_first_fields(list_path: str) -> list[tuple[int, str]]:
    """Return the line number and the first comma-separated field of each non-blank line, in file order.

    Raises ImageListError naming the file or the line when it cannot be read, is not UTF-8,
    or has a line whose first field is empty.
    """
    fields = []
    for line_no, line in enumerate(io.StringIO(read_list_text(list_path), newline=None), start=1):
        if not line.strip():
            continue
        first = line.split(",", 1)[0].strip()
        if not first:
            raise ImageListError(f"{list_path}:{line_no}: the line has no id in its first field; fix or remove the line")
        fields.append((line_no, first))
    return fields


def _check_characters(path: str, list_path: str, line_no: int) -> None:
    # a NUL byte makes every file-system call on the path fail with ValueError, and other
    # control characters are never part of a real image path
    match = _CONTROL_CHAR.search(path)
    control = match.group() if match else None
    if control == "\t":
        raise ImageListError(
            f"{list_path}:{line_no}: path {path!r} contains a tab; separate the fields of "
            "'path,label,domain' with commas, not tabs"
        )
    if control is not None:
        raise ImageListError(
            f"{list_path}:{line_no}: path {path!r} contains the control character U+{ord(control):04X}; "
            "remove it from the list"
        )
    # decoding drops a byte-order mark only at the start of the file, but joining lists with `cat` leaves others
    if "\ufeff" in path:
        raise ImageListError(
            f"{list_path}:{line_no}: path {path!r} contains a byte-order mark (U+FEFF), as lists joined with "
            "cat contain; remove it from the list"
        )


def read_image_list(list_path: str | os.PathLike, require_labels: bool = False) -> list[ListEntry]:
    """Parse a list file into entries in file order.

    Raises ImageListError with the line number for a line that is not UTF-8, a
    malformed line, a path with a control character or a byte-order mark or one that
    escapes the dataset folder, and a duplicate path, a second spelling of a listed path
    ("./a.jpg" after "a.jpg") or a duplicate id. It also raises for a missing label when
    `require_labels` is set, and for a list without any entry.
    """
    list_path = str(list_path)
    entries: list[ListEntry] = []
    first_line_of_id: dict[str, tuple[int, str]] = {}
    first_line_of_normalised: dict[str, tuple[int, str]] = {}

    # the BOM is dropped on decoding; universal newlines turn \r\n and \r into \n
    for line_no, raw in enumerate(io.StringIO(read_list_text(list_path), newline=None), start=1):
        line = raw.strip()
        if not line:
            continue

        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 1:
            if require_labels:
                raise ImageListError(
                    f"{list_path}:{line_no}: line {line!r} has a path but no label and domain; "
                    "labelled lists need 'path,label,domain'"
                )
            path, label, domain = fields[0], None, None
        elif len(fields) == 3:
            path = fields[0]
            label = _parse_int(fields[1], "label", list_path, line_no)
            domain = _parse_int(fields[2], "domain", list_path, line_no)
        else:
            raise ImageListError(
                f"{list_path}:{line_no}: expected 'path,label,domain' (3 fields) or a path "
                f"alone, got {len(fields)} fields in {line!r}; paths cannot contain commas"
            )

        if not path:
            raise ImageListError(f"{list_path}:{line_no}: empty path in {line!r}")
        _check_characters(path, list_path, line_no)
        _check_relative(path, list_path, line_no)
        # two paths with one HDF5 id (a Unicode path and its escaped spelling) would give
        # the output two rows with the same id
        image_id = escape_id(path)
        if image_id in first_line_of_id and first_line_of_id[image_id][1] != path:
            other_line, other_path = first_line_of_id[image_id]
            raise ImageListError(
                f"{list_path}:{line_no}: path {path!r} has the same HDF5 id {image_id!r} as {other_path!r} "
                f"on line {other_line}; keep one of the two lines"
            )
        # "./a.jpg" or a decomposed "café.jpg" names the same file as "a.jpg" or "café.jpg" under
        # a different id, so the image would become its own positive in retrieval
        normalised = unicodedata.normalize("NFC", posixpath.normpath(_decoded_path(path)))
        if normalised in first_line_of_normalised:
            other_line, other_path = first_line_of_normalised[normalised]
            if other_path == path:
                raise ImageListError(
                    f"{list_path}:{line_no}: duplicate path {path!r} (first on line {other_line}); "
                    "remove the repeated line"
                )
            spelling = ""
            if posixpath.normpath(_decoded_path(path)) != posixpath.normpath(_decoded_path(other_path)):
                # the two look alike when printed, so their ids show the difference
                spelling = (f" in another Unicode normalisation (ids {escape_id(path)!r} and "
                            f"{escape_id(other_path)!r})")
            raise ImageListError(
                f"{list_path}:{line_no}: path {path!r} names the same file as {other_path!r} on line "
                f"{other_line}{spelling}; keep one of the two lines"
            )
        first_line_of_normalised[normalised] = (line_no, path)
        first_line_of_id[image_id] = (line_no, path)
        entries.append(ListEntry(path, label, domain, line_no))

    if not entries:
        raise ImageListError(f"{list_path}: the list contains no image paths")
    return entries


def _walk_image_files(root: Path) -> list[str]:
    """Return the image files under `root` as relative POSIX paths, following symlinked folders.

    Path.rglob does not follow symlinked folders before Python 3.13. A folder whose real path
    was already visited (a symlink loop or a second link to it) is not entered again.
    """
    found = []
    visited = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders.clear()
            continue
        visited.add(real)
        subfolders.sort()  # so the first link to a folder, by path, is the one listed
        relative = Path(folder).relative_to(root)
        for name in files:
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append((relative / name).as_posix())
    return found


def _listable(path: str) -> bool:
    """Return True when a list line can give `path`: read_image_list splits fields at commas, strips them and checks them."""
    if "," in path or path != path.strip():
        return False
    try:
        _check_characters(path, "", 0)
        _check_relative(path, "", 0)
    except ImageListError:
        return False
    return True


def scan_image_dir(dataset_dir: str | os.PathLike) -> list[ListEntry]:
    """List every image file under `dataset_dir` as unlabelled entries, sorted by path."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ImageListError(f"--dataset_dir {str(root)!r} is not a folder")
    paths = sorted(_walk_image_files(root))
    if not paths:
        raise ImageListError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}"
        )
    # a list cannot name these files, so no list could give them labels or select their rows
    unlisted = [path for path in paths if not _listable(path)]
    if unlisted:
        files = "1 image file has" if len(unlisted) == 1 else f"{len(unlisted)} image files have"
        raise ImageListError(
            f"{files} a path under {str(root)!r} that a 'path,label,domain' list cannot name, such as "
            f"{unlisted[0]!r} (a comma, a control character, a byte-order mark, spaces at its start or end, or a "
            "form that lists reject as absolute or leaving the folder); "
            "rename them, or pass --selected_ids with a list of the images to extract"
        )
    path_of_id: dict[str, str] = {}
    path_of_normalised: dict[str, str] = {}
    for path in paths:
        other = path_of_id.setdefault(escape_id(path), path)
        if other != path:
            raise ImageListError(
                f"{other!r} and {path!r} under {str(root)!r} have the same HDF5 id {escape_id(path)!r}; "
                "pass --selected_ids with a list that names only one of them"
            )
        # a list rejects the second of two names that differ only in Unicode normalisation
        other = path_of_normalised.setdefault(unicodedata.normalize("NFC", path), path)
        if other != path:
            raise ImageListError(
                f"{escape_id(other)!r} and {escape_id(path)!r} under {str(root)!r} are one name in two Unicode "
                "normalisations, which no list can name both of; rename one, or pass --selected_ids with a list "
                "that names only one of them"
            )
    return [ListEntry(path, None, None, 0) for path in paths]


def _decoded_path(path: str) -> str:
    """Return the Unicode path whose ILIAS id is `path`, or `path` itself when it is no such id.

    Only a path that escape_id gives back is decoded, so "#U002e#U002e" cannot become "..".
    """
    if not _ESCAPED_CHAR.search(path):
        return path
    unicode_path = unescape_id(path)
    return unicode_path if escape_id(unicode_path) == path else path


def _path_spellings(path: str) -> list[str]:
    """Return other spellings of a list path that can name its file, in the order they are tried."""
    # a list rebuilt from an HDF5 index gives the escaped form of a Unicode file name
    unicode_path = _decoded_path(path)
    spellings = [escape_id(path)] if not path.isascii() else []
    # files copied from macOS keep decomposed (NFD) names, and lists are usually composed (NFC)
    for form in ("NFC", "NFD"):
        spellings.append(unicodedata.normalize(form, unicode_path))
    return [spelling for spelling in dict.fromkeys(spellings) if spelling != path]


def resolve_image_path(dataset_dir: str | os.PathLike, path: str) -> Path:
    """Return the file to read for a list path.

    Some UnED folders (RP2K) store files under the escaped name rather than the Unicode
    one, lists rebuilt from an HDF5 index give escaped names, and files copied from macOS
    have decomposed Unicode names. When the listed name does not exist, the first of
    these spellings that exists is used. When none exists, the listed name is returned.
    """
    full = Path(dataset_dir) / path
    if path.isascii() and not _ESCAPED_CHAR.search(path):
        return full
    if _exists(full):
        return full
    for spelling in _path_spellings(path):
        candidate = Path(dataset_dir) / spelling
        if _exists(candidate):
            return candidate
    return full


def _exists(path: Path) -> bool:
    # Path.exists() raises for some errors, such as a name longer than the file system
    # allows; the caller reports those when it opens the listed path
    try:
        return path.exists()
    except OSError:
        return False
