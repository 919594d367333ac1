import hashlib
import unicodedata

import pytest

from feature_extraction.image_list import (
    ImageListError,
    canonical_id,
    escape_id,
    file_sha256,
    read_image_list,
    resolve_image_path,
    scan_image_dir,
    unescape_id,
)


def _ilias_escape(path: str) -> str:
    # the ILIAS extractor's expression, kept here as the reference for exact id matching
    return str(path.encode("unicode-escape")).replace("\\\\u", "#U").replace("\\\\x", "#U00")[2:-1]


@pytest.mark.parametrize(
    "path, expected",
    [
        ("plain/ascii_file.jpg", "plain/ascii_file.jpg"),
        ("rp2k/货架.jpg", "rp2k/#U8d27#U67b6.jpg"),
        ("caf\u00e9.jpg", "caf#U00e9.jpg"),
        ("mixed/\u00e9\u8d27x.png", "mixed/#U00e9#U8d27x.png"),
        ("emoji\U0001f600.jpg", "emoji\\\\U0001f600.jpg"),
        ("back\\slash.jpg", "back\\\\\\\\slash.jpg"),
        ("it's.jpg", "it's.jpg"),
        ("it's \"q\".jpg", "it\\'s \"q\".jpg"),
    ],
)
def test_escape_id_examples(path, expected):
    assert escape_id(path) == expected
    assert escape_id(path).isascii()


@pytest.mark.parametrize("path", ["a/b.jpg", "货/架.jpg", "é", "x\\y.jpg", "emoji\U0001f600.jpg", "tab\tname"])
def test_escape_id_matches_ilias(path):
    assert escape_id(path) == _ilias_escape(path)


@pytest.mark.parametrize("path", ["rp2k/货架.jpg", "caf\u00e9.jpg", "a/b.jpg", "Ünïcödé/ß.png"])
def test_unescape_id_round_trip(path):
    assert unescape_id(escape_id(path)) == path


def test_canonical_id_escapes_only_unicode():
    assert canonical_id("货架.jpg") == "#U8d27#U67b6.jpg"
    assert canonical_id("#U8d27#U67b6.jpg") == "#U8d27#U67b6.jpg"


def test_read_list_keeps_order_and_fields(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes("\ufeffz.jpg,3,1\r\n\r\na/货.jpg,0,2\r\nonly_path.png\r\n".encode("utf-8"))
    entries = read_image_list(list_path)
    assert [e.path for e in entries] == ["z.jpg", "a/货.jpg", "only_path.png"]
    assert [(e.label, e.domain) for e in entries] == [(3, 1), (0, 2), (None, None)]
    assert [e.line_no for e in entries] == [1, 3, 4]


@pytest.mark.parametrize(
    "line, message",
    [
        ("/abs/x.jpg,0,0", "absolute path"),
        ("C:\\x.jpg,0,0", "absolute path"),
        ("../x.jpg,0,0", r"contains '\.\.'"),
        ("a/../../x.jpg,0,0", r"contains '\.\.'"),
        ("a.jpg,x,0", "label 'x' is not an integer"),
        ("a.jpg,1", "expected 'path,label,domain'"),
        ("a.jpg,1,2,3", "got 4 fields"),
    ],
)
def test_read_list_rejects_bad_line(tmp_path, line, message):
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"ok.jpg,0,0\n{line}\n")
    with pytest.raises(ImageListError, match=message) as info:
        read_image_list(list_path)
    assert ":2:" in str(info.value)


def test_read_list_rejects_duplicates(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("a.jpg,0,0\nb.jpg,0,0\na.jpg,1,1\n")
    with pytest.raises(ImageListError, match=r"duplicate path 'a.jpg' \(first on line 1\)"):
        read_image_list(list_path)


@pytest.mark.parametrize("first, second", [("a.jpg", "./a.jpg"), ("x/b.jpg", "x//b.jpg"), ("x/./b.jpg", "x/b.jpg")])
def test_read_list_rejects_respelled_path(tmp_path, first, second):
    # as two rows, one image would be its own positive
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"{first},0,0\nc.jpg,0,0\n{second},0,0\n")
    with pytest.raises(ImageListError, match=rf"list.txt:3: path '{second}' names the same file as '{first}' on line 1"):
        read_image_list(list_path)


def test_read_list_rejects_empty_list(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("\n\n")
    with pytest.raises(ImageListError, match="contains no image paths"):
        read_image_list(list_path)


def test_read_list_int64_bounds(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"a.jpg,{2**63 - 1},{-(2**63)}\nb.jpg,10,0\nc.jpg,{2**63},0\n")
    with pytest.raises(ImageListError, match=f"list.txt:3: label '{2**63}' does not fit in a 64-bit integer"):
        read_image_list(list_path)
    list_path.write_text(f"a.jpg,{2**63 - 1},{-(2**63)}\nb.jpg, +007 ,-0\n")
    assert [(e.label, e.domain) for e in read_image_list(list_path)] == [(2**63 - 1, -(2**63)), (7, 0)]


@pytest.mark.parametrize("value", ["1_0", "\u0661\u0660", "\uff11\uff10", "1e1", "0x10", ""])
def test_read_list_label_spellings_rejected(tmp_path, value):
    # Regression: Python's int() read "1_0" and "10" in Arabic-Indic or full-width digits
    # as 10, so such labels silently joined class 10
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"a.jpg,10,0\nb.jpg,{value},0\n", encoding="utf-8")
    with pytest.raises(ImageListError, match=rf"list.txt:2: label {value!r} is not an integer in ASCII digits \(such as 12 or -3\); "):
        read_image_list(list_path)


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_read_list_unreadable_file(tmp_path, kind):
    list_path = tmp_path / "list.txt"
    if kind == "folder":
        list_path.mkdir()
    with pytest.raises(ImageListError, match=f"cannot read the list {str(list_path)!r}: .*; check the path"):
        read_image_list(list_path)


def test_read_list_requires_labels_when_asked(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("a.jpg\n")
    with pytest.raises(ImageListError, match="no label and domain"):
        read_image_list(list_path, require_labels=True)


@pytest.mark.parametrize("second", [unicodedata.normalize("NFD", "café.jpg"), "cafe#U0301.jpg"],
                         ids=["decomposed", "escaped_decomposed"])
def test_other_normalisation_is_second_spelling(tmp_path, second):
    # Regression: both lines were kept, and extract.py read one file for two ids
    list_path = tmp_path / "list.txt"
    list_path.write_text(f"café.jpg,0,0\n{second},0,0\n", encoding="utf-8")
    with pytest.raises(ImageListError, match=r"list.txt:2: path .* names the same file as 'café.jpg' on line 1"):
        read_image_list(list_path)


def test_scan_image_dir_rejects_two_normalisations(tmp_path):
    # Regression: both files were extracted, and a list built from the output's ids was rejected; sorted
    # by path, the decomposed name comes first
    for form in ("NFC", "NFD"):
        (tmp_path / unicodedata.normalize(form, "café.jpg")).write_bytes(b"x")
    with pytest.raises(ImageListError, match="'cafe#U0301.jpg' and 'caf#U00e9.jpg' .* one name in two Unicode"):
        scan_image_dir(tmp_path)


def test_other_normalisation_message_shows_ids(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_text("café.jpg,0,0\n" + unicodedata.normalize("NFD", "café.jpg") + ",0,0\n", encoding="utf-8")
    with pytest.raises(ImageListError, match=r"in another Unicode normalisation \(ids 'cafe#U0301.jpg' and "
                                             r"'caf#U00e9.jpg'\)"):
        read_image_list(list_path)


def test_scan_image_dir_sorted_relative(tmp_path):
    for name in ["b/2.jpg", "a/1.PNG", "a/notes.txt", "c.webp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    entries = scan_image_dir(tmp_path)
    assert [e.path for e in entries] == ["a/1.PNG", "b/2.jpg", "c.webp"]


def test_scan_image_dir_follows_symlinked_folders(tmp_path):
    # Regression: Path.rglob skipped symlinked folders, so their images were silently left out
    root = tmp_path / "root"
    (root / "own").mkdir(parents=True)
    (root / "own" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"x")
    (tmp_path / "elsewhere" / "deep" / "c.jpg").write_bytes(b"x")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    # a loop back to the root must not be entered again
    (root / "own" / "loop").symlink_to(root, target_is_directory=True)

    entries = scan_image_dir(root)
    assert [e.path for e in entries] == ["linked/b.png", "linked/deep/c.jpg", "own/a.jpg"]


def test_scan_image_dir_rejects_missing_folder(tmp_path):
    with pytest.raises(ImageListError, match="is not a folder"):
        scan_image_dir(tmp_path / "absent")


def test_resolve_image_path_prefers_unicode_name(tmp_path):
    (tmp_path / "货.jpg").write_bytes(b"u")
    (tmp_path / escape_id("货.jpg")).write_bytes(b"e")
    assert resolve_image_path(tmp_path, "货.jpg") == tmp_path / "货.jpg"


def test_resolve_image_path_falls_back_to_escaped_name(tmp_path):
    (tmp_path / "#U8d27.jpg").write_bytes(b"e")
    assert resolve_image_path(tmp_path, "货.jpg") == tmp_path / "#U8d27.jpg"


def test_resolve_image_path_missing_keeps_listed_name(tmp_path):
    assert resolve_image_path(tmp_path, "货.jpg") == tmp_path / "货.jpg"


def test_resolve_image_path_unescapes_listed_id(tmp_path):
    # Regression: a list rebuilt from an HDF5 index names "naïve.jpg" as "na#U00efve.jpg"
    (tmp_path / "naïve.jpg").write_bytes(b"u")
    assert resolve_image_path(tmp_path, "na#U00efve.jpg") == tmp_path / "naïve.jpg"


@pytest.mark.parametrize("listed", ["#U002e#U002e/secret.jpg", "#U002fsecret.jpg"], ids=["dot_dot", "slash"])
def test_resolve_image_path_keeps_ascii_escapes(tmp_path, listed):
    # escape_id never writes ASCII characters as #U00xx, so such a path is not decoded into one
    # that leaves the dataset folder
    (tmp_path / "secret.jpg").write_bytes(b"s")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    assert resolve_image_path(dataset, listed) == dataset / listed


@pytest.mark.parametrize("listed_form, file_form", [("NFC", "NFD"), ("NFD", "NFC")])
def test_resolve_image_path_other_normalisation(tmp_path, listed_form, file_form):
    # Regression: a composed list path did not find the decomposed file name that macOS copies keep
    on_disk = unicodedata.normalize(file_form, "café.jpg")
    (tmp_path / on_disk).write_bytes(b"u")
    assert resolve_image_path(tmp_path, unicodedata.normalize(listed_form, "café.jpg")) == tmp_path / on_disk


def test_resolve_image_path_prefers_exact_name(tmp_path):
    # both spellings exist as separate files, so the listed one is read
    for form in ("NFC", "NFD"):
        (tmp_path / unicodedata.normalize(form, "café.jpg")).write_bytes(form.encode())
    listed = unicodedata.normalize("NFD", "café.jpg")
    assert resolve_image_path(tmp_path, listed) == tmp_path / listed


@pytest.mark.parametrize("name", ["a,b.jpg", "nl\nx.jpg", "tab\ty.jpg", " top.jpg", "\ufeffbom.jpg", "..\\x.jpg",
                                  "\\x.jpg"],
                         ids=["comma", "newline", "tab", "leading_space", "byte_order_mark", "backslash_dots",
                              "backslash_start"])
def test_scan_image_dir_rejects_unlistable_names(tmp_path, name):
    # Regression: such names were extracted, and the failure report split a newline name over two lines
    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ImageListError, match="1 image file has a path under .* that a .* list cannot name") as info:
        scan_image_dir(tmp_path)
    assert repr(name) in str(info.value)
    assert "--selected_ids" in str(info.value)


def test_file_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
