"""Eval sets built offline: an ImageFolder directory or an image+caption table becomes a
clip_benchmark webdataset (``curate eval-export-folder``).

The output is the layout clip_benchmark's ``build_wds_dataset`` reads (``--dataset wds/NAME
--dataset_root OUT``) and :func:`curate.evaluate.tasks.open_task` reads (``OUT`` named
``{data_dir}/wds_{key}_test``)::

    OUT/test/0.tar .. N-1.tar     samples s0000000, s0000001, ... (clip_benchmark's keys)
    OUT/test/nshards.txt          N
    OUT/count.txt                 number of samples
    OUT/dataset_type.txt          classification | retrieval
    OUT/classnames.txt            classification: one name per class id
    OUT/zeroshot_classification_templates.txt   classification: one template per line, {c}

A classification sample is ``KEY.{jpg|png|webp}`` + ``KEY.cls`` (the class id as decimal
text); a retrieval sample is the image + ``KEY.txt`` (its captions, one per line; a line break
inside a caption is written as the two characters ``\\n``, as clip_benchmark's converter does).

* :func:`export_folder`: one subfolder of SRC per class, as torchvision's ``ImageFolder``
  reads it: classes are the subfolder names in sorted order (class id = position), a class's
  images are every file with an image suffix below its folder (``os.walk`` sorted, links
  followed), in that order. Names starting with "." are skipped (``.ipynb_checkpoints``,
  ``.DS_Store``; ImageFolder would take a hidden folder as a class). Class names are the folder
  names or come from a mapping file (``wnid name`` lines or a JSON object); templates from a
  file or OpenAI's 80 ImageNet templates (:data:`IMAGENET_TEMPLATES`, what DataComp's ImageNet
  sets carry).
* :func:`export_captions`: a csv/tsv/parquet table with an image path column and a caption
  column (a string, or a list of strings per row); rows naming the same image give it several
  captions; images are in order of first appearance.

Images are streamed one at a time: each is decoded once with PIL (an unreadable one is a
one-line error naming the file) and its file bytes are copied when it is a JPEG, PNG or WebP,
else it is re-encoded as PNG. Tars are written by :class:`curate.shards.tar.TarWriter` (fixed
metadata), so the same input gives the same bytes. The output is built beside OUT and swapped in
when complete (:func:`curate.atomic.replace_dir`): a failed or killed export changes nothing,
and an existing OUT is replaced only with ``overwrite=True`` (never when OUT is or contains the
input).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from curate.atomic import replace_dir
from curate.evaluate import EvalError
from curate.evaluate.models import fill_template
from curate.evaluate.tasks import TASKLIST, load_tasklist, task_dir
from curate.shards.tar import TarWriter

#: OpenAI's 80 prompt templates for ImageNet (clip_benchmark's ``imagenet1k`` templates, the
#: ``zeroshot_classification_templates.txt`` of DataComp's ImageNet sets), in their order.
IMAGENET_TEMPLATES = (
    "a bad photo of a {c}.", "a photo of many {c}.", "a sculpture of a {c}.",
    "a photo of the hard to see {c}.", "a low resolution photo of the {c}.", "a rendering of a {c}.",
    "graffiti of a {c}.", "a bad photo of the {c}.", "a cropped photo of the {c}.", "a tattoo of a {c}.",
    "the embroidered {c}.", "a photo of a hard to see {c}.", "a bright photo of a {c}.",
    "a photo of a clean {c}.", "a photo of a dirty {c}.", "a dark photo of the {c}.", "a drawing of a {c}.",
    "a photo of my {c}.", "the plastic {c}.", "a photo of the cool {c}.", "a close-up photo of a {c}.",
    "a black and white photo of the {c}.", "a painting of the {c}.", "a painting of a {c}.",
    "a pixelated photo of the {c}.", "a sculpture of the {c}.", "a bright photo of the {c}.",
    "a cropped photo of a {c}.", "a plastic {c}.", "a photo of the dirty {c}.",
    "a jpeg corrupted photo of a {c}.", "a blurry photo of the {c}.", "a photo of the {c}.",
    "a good photo of the {c}.", "a rendering of the {c}.", "a {c} in a video game.", "a photo of one {c}.",
    "a doodle of a {c}.", "a close-up photo of the {c}.", "a photo of a {c}.", "the origami {c}.",
    "the {c} in a video game.", "a sketch of a {c}.", "a doodle of the {c}.", "a origami {c}.",
    "a low resolution photo of a {c}.", "the toy {c}.", "a rendition of the {c}.",
    "a photo of the clean {c}.", "a photo of a large {c}.", "a rendition of a {c}.",
    "a photo of a nice {c}.", "a photo of a weird {c}.", "a blurry photo of a {c}.", "a cartoon {c}.",
    "art of a {c}.", "a sketch of the {c}.", "a embroidered {c}.", "a pixelated photo of a {c}.",
    "itap of the {c}.", "a jpeg corrupted photo of the {c}.", "a good photo of a {c}.", "a plushie {c}.",
    "a photo of the nice {c}.", "a photo of the small {c}.", "a photo of the weird {c}.",
    "the cartoon {c}.", "art of the {c}.", "a drawing of the {c}.", "a photo of the large {c}.",
    "a black and white photo of a {c}.", "the plushie {c}.", "a dark photo of a {c}.", "itap of a {c}.",
    "graffiti of the {c}.", "a toy {c}.", "itap of my {c}.", "a photo of a cool {c}.",
    "a photo of a small {c}.", "a tattoo of the {c}.",
)

#: torchvision's ImageFolder image suffixes (compared lower-cased)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: PIL format -> member extension whose bytes are copied as they are (clip_benchmark decodes these)
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a camera JPEG
KINDS = ("classification", "retrieval")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path")
CAPTION_COLUMNS = ("caption", "captions", "text")
WNID = re.compile(r"^n\d{8}$")

# what eval-export-folder writes: only these are ever replaced
_OWNED = re.compile(r"test/(?:[0-9]+\.tar|nshards\.txt)|dataset_type\.txt|count\.txt|classnames\.txt"
                    r"|zeroshot_classification_templates\.txt")
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")  # what str.splitlines splits on


@dataclass
class ExportResult:
    out: Path
    kind: str
    samples: int
    shards: int
    classes: list[str] | None = None
    templates: int | None = None
    captions: int | None = None
    notes: list[str] = field(default_factory=list)  # things worth telling the user (not errors)


# ------------------------------------------------------------------------------- inputs


def _visible(name: str) -> bool:
    return not name.startswith(".")


def folder_classes(src: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """(class folder name, [image paths]) per class of an ImageFolder directory, in
    ImageFolder's order; an empty class folder or a directory without class folders is an error."""
    src = Path(src)
    if not src.is_dir():
        raise EvalError(f"{src}: not a directory (an ImageFolder: one subfolder per class)")
    names = sorted(e.name for e in os.scandir(src) if e.is_dir() and _visible(e.name))
    if not names:
        raise EvalError(f"{src}: no class folders (an ImageFolder has one subfolder of images per class)")
    out = []
    for name in names:
        files = []
        for root, _, fnames in sorted(os.walk(src / name, followlinks=True)):
            if any(not _visible(p) for p in Path(root).relative_to(src).parts):
                continue
            files += [Path(root, f) for f in sorted(fnames)
                      if _visible(f) and f.lower().endswith(IMAGE_SUFFIXES)]
        if not files:
            raise EvalError(f"{src / name}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        out.append((name, files))
    return out


def _clean_name(name: str, where: str) -> str:
    name = str(name).strip()
    if not name or _LINE_BREAKS.search(name):
        raise EvalError(f"{where}: a class name must be one non-empty line, got {name!r}")
    return name


def read_classnames(path: str | os.PathLike, folders: list[str]) -> list[str]:
    """Class names for ``folders`` from a mapping file: a JSON object ``{folder: name}``, or text
    lines ``FOLDER NAME`` (the first whitespace-separated word is the folder, e.g. ImageNet's
    ``n01440764 tench``). Entries for folders not present are ignored; a folder without one is
    an error."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: cannot read the class names ({e})") from None
    mapping: dict[str, str] = {}
    if p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise EvalError(f"{p}: not JSON ({e})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise EvalError(f"{p}: expected a JSON object {{folder: class name}}")
        mapping = {str(k): v for k, v in obj.items()}
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                raise EvalError(f"{p}: line {i}: expected 'FOLDER NAME', got {line.strip()!r}")
            if parts[0] in mapping:
                raise EvalError(f"{p}: line {i}: folder {parts[0]!r} is named twice")
            mapping[parts[0]] = parts[1]
    missing = [f for f in folders if f not in mapping]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EvalError(f"{p}: no class name for folder {missing[0]!r}{more}")
    return [_clean_name(mapping[f], f"{p}: folder {f!r}") for f in folders]


def read_templates(path: str | os.PathLike) -> list[str]:
    """Templates from a text file: every non-blank line, stripped; each needs ``{c}`` and must
    fill with ``str.format(c=...)`` as clip_benchmark fills it."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{p}: cannot read the templates ({e})") from None
    out = [ln.strip() for ln in lines if ln.strip()]
    if not out:
        raise EvalError(f"{p}: no templates")
    for t in out:
        if "{c}" not in t:
            raise EvalError(f"{p}: template {t!r} lacks the {{c}} placeholder")
        fill_template(t, "x", str(p))
    return out


def _column(names: list[str], given: str | None, defaults: tuple[str, ...], what: str, where) -> str:
    if given is not None:
        if given not in names:
            raise EvalError(f"{where}: missing {what} column {given!r} (found {', '.join(names)})")
        return given
    for c in defaults:
        if c in names:
            return c
    raise EvalError(f"{where}: missing {what} column (none of {', '.join(defaults)}; found {', '.join(names)}); "
                    f"name it with --{what}-column")


def _table_batches(path: Path, image_column: str | None, caption_column: str | None):
    """(image column, caption column, record batches of the two) of a csv/tsv/parquet table."""
    import pyarrow as pa  # lazy: only caption tables need it

    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise EvalError(f"{path}: a caption table is .csv, .tsv or .parquet")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # lazy: only caption tables need it

            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            ic = _column(names, image_column, IMAGE_COLUMNS, "image", path)
            cc = _column(names, caption_column, CAPTION_COLUMNS, "caption", path)
            return ic, cc, pf.iter_batches(batch_size=4096, columns=[ic, cc])
        import pyarrow.csv as pcsv  # lazy: only caption tables need it

        parse = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
        names = pcsv.open_csv(path, parse_options=parse).schema.names
        ic = _column(names, image_column, IMAGE_COLUMNS, "image", path)
        cc = _column(names, caption_column, CAPTION_COLUMNS, "caption", path)
        # both columns read as text (a path column of digits stays a path), only these two
        conv = pcsv.ConvertOptions(column_types={ic: pa.string(), cc: pa.string()}, include_columns=[ic, cc],
                                   strings_can_be_null=False)
        reader = pcsv.open_csv(path, parse_options=parse, convert_options=conv)
        return ic, cc, (b.select([ic, cc]) for b in reader)
    except (OSError, pa.ArrowInvalid) as e:
        raise EvalError(f"{path}: not a readable table ({str(e).splitlines()[0]})") from None


def caption_table(path: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
                  image_root: str | os.PathLike | None = None) -> list[tuple[Path, int, list[str]]]:
    """(image path, first row, [captions]) per image of a caption table, in order of first
    appearance. Relative image paths are under ``image_root`` (default: the table's folder).
    Only the two columns are read; captions are text, the images are read later one at a time."""
    import pyarrow as pa  # lazy: only caption tables need it

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: caption table not found")
    root = Path(image_root) if image_root is not None else path.parent
    ic, cc, batches = _table_batches(path, image_column, caption_column)
    images: dict[str, tuple[Path, int, list[str]]] = {}
    row = 0
    try:
        for b in batches:
            for img, cap in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                where = f"{path}: row {row + 1}"  # 1-based data rows (the header is not counted)
                if not isinstance(img, str) or not img.strip():
                    raise EvalError(f"{where}: column {ic!r} has no image path")
                caps = cap if isinstance(cap, list) else [cap]
                if not caps:
                    raise EvalError(f"{where}: column {cc!r} has an empty list of captions")
                for c in caps:
                    if not isinstance(c, str) or not c.strip():
                        raise EvalError(f"{where}: column {cc!r} has an empty caption")
                p = Path(os.path.normpath(root / img.strip()))
                entry = images.setdefault(str(p), (p, row + 1, []))
                entry[2].extend(caps)
                row += 1
    except pa.ArrowInvalid as e:
        raise EvalError(f"{path}: not a readable table ({str(e).splitlines()[0]})") from None
    if not images:
        raise EvalError(f"{path}: no rows")
    return list(images.values())


# ------------------------------------------------------------------------------- writing


def image_member(path: Path) -> tuple[str, bytes]:
    """(member extension, bytes) of one image file: decoded once to prove it readable; JPEG,
    PNG and WebP bytes kept as they are, anything else re-encoded as PNG."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EvalError(f"{path}: cannot read the image ({e.strerror or e})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            if fmt in KEPT_FORMATS:
                return KEPT_FORMATS[fmt], data
            if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                im = im.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return "png", buf.getvalue()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvalError(f"{path}: not a readable image ({why})") from None


def caption_text(captions: list[str]) -> str:
    """The ``txt`` member of a retrieval sample: one caption per line (clip_benchmark reads it
    with ``str.splitlines``), a line break inside a caption written as ``\\n``."""
    return "\n".join(_LINE_BREAKS.sub(r"\\n", c) for c in captions)


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def check_out_dir(out: Path, sources: list[Path], overwrite: bool, src_is_folder: bool) -> None:
    """Refuse what would destroy data: an existing non-empty OUT without ``overwrite``, an OUT
    that is or contains an input, an OUT inside an ImageFolder (it would be read as a class)."""
    o = out.resolve()
    for s in sources:
        s = s.resolve()
        if src_is_folder and o != s and _inside(o, s):
            raise EvalError(f"{out}: is inside the input folder {s} (it would be read as a class folder); "
                            f"write it elsewhere")
    if o.exists() and not o.is_dir():
        raise EvalError(f"{out}: exists and is not a directory")
    if o.is_dir() and any(o.iterdir()):
        if not overwrite:
            raise EvalError(f"{out}: exists; pass --overwrite to replace it (nothing was changed)")
        for s in sources:
            if _inside(s.resolve(), o):
                raise EvalError(f"{out}: --overwrite refused: it is or contains the input {s}")


def _write(out: Path, kind: str, samples, shard_size: int, classes: list[str] | None,
           templates: list[str] | None, progress, total: int) -> int:
    """Write the samples (an iterator of ``[(ext, bytes), ...]``, one sample at a time) in the
    layout above, atomically; returns the shard count."""
    if shard_size < 1:
        raise EvalError(f"--shard-size {shard_size}: must be at least 1")
    n = 0
    with replace_dir(out, _OWNED, what="curate eval-export-folder", error=EvalError) as tmp:
        (tmp / "test").mkdir()
        f = tar = None
        it = samples if progress is None else progress(samples, total=total)
        try:
            for members in it:
                if n % shard_size == 0:
                    if tar is not None:
                        tar.close()
                        f.close()
                    f = open(tmp / "test" / f"{n // shard_size}.tar", "wb", buffering=1 << 20)
                    tar = TarWriter(f)
                key = f"s{n:07d}"
                for ext, data in members:
                    tar.add(f"{key}.{ext}", data)
                n += 1
            if tar is not None:
                tar.close()
        finally:
            if f is not None:
                f.close()
        shards = -(-n // shard_size)
        (tmp / "test" / "nshards.txt").write_text(f"{shards}\n")
        (tmp / "count.txt").write_text(f"{n}\n")
        (tmp / "dataset_type.txt").write_text(f"{kind}\n")
        if classes is not None:
            (tmp / "classnames.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
            (tmp / "zeroshot_classification_templates.txt").write_text(
                "".join(f"{t}\n" for t in templates), encoding="utf-8")
    return shards


def export_folder(src: str | os.PathLike, out: str | os.PathLike, *, classnames: str | os.PathLike | None = None,
                  templates: str | os.PathLike | None = None, shard_size: int = 1000, overwrite: bool = False,
                  progress=None) -> ExportResult:
    """An ImageFolder directory as a zero-shot classification set at ``out`` (see the module doc)."""
    src, out = Path(src), Path(out)
    check_out_dir(out, [src], overwrite, src_is_folder=True)
    classes = folder_classes(src)
    folders = [c for c, _ in classes]
    names = read_classnames(classnames, folders) if classnames else [_clean_name(f, f"{src / f}") for f in folders]
    temps = read_templates(templates) if templates else list(IMAGENET_TEMPLATES)
    res = ExportResult(out, "classification", sum(len(f) for _, f in classes), 0, names, len(temps))
    if not classnames and all(WNID.match(f) for f in folders):
        res.notes.append("the class folders are WordNet ids: the prompts will read 'a photo of a n01440764.'; "
                         "pass --classnames FILE with 'WNID NAME' lines")

    def samples():
        for label, (_, files) in enumerate(classes):
            for p in files:
                ext, data = image_member(p)
                yield [(ext, data), ("cls", str(label).encode())]

    res.shards = _write(out, "classification", samples(), shard_size, names, temps, progress, res.samples)
    return res


def export_captions(table: str | os.PathLike, out: str | os.PathLike, *, image_column: str | None = None,
                    caption_column: str | None = None, image_root: str | os.PathLike | None = None,
                    shard_size: int = 1000, overwrite: bool = False, progress=None) -> ExportResult:
    """An image+caption table as a zero-shot retrieval set at ``out`` (see the module doc)."""
    table, out = Path(table), Path(out)
    check_out_dir(out, [table], overwrite, src_is_folder=False)
    rows = caption_table(table, image_column, caption_column, image_root)
    o = out.resolve()
    res = ExportResult(out, "retrieval", len(rows), 0, captions=sum(len(c) for _, _, c in rows))

    def samples():
        for p, row, caps in rows:
            if _inside(p.resolve(), o):
                raise EvalError(f"{table}: row {row}: image {p} is inside the output {out}, which is replaced")
            if not p.is_file():
                raise EvalError(f"{table}: row {row}: image {p} not found")
            ext, data = image_member(p)
            yield [(ext, data), ("txt", caption_text(caps).encode("utf-8"))]

    res.shards = _write(out, "retrieval", samples(), shard_size, None, None, progress, res.samples)
    return res


def export_eval_set(src: str | os.PathLike, out: str | os.PathLike, *, kind: str | None = None,
                    task: str | None = None, tasks: str | os.PathLike | None = None, **kw) -> ExportResult:
    """:func:`export_folder` for a directory, :func:`export_captions` for a table. ``kind``
    (classification | retrieval), when given, must match the input. ``task``: the key of the
    task list (``tasks``, default eval/tasklist.yml) the set is for: checked before anything is
    read (:func:`check_task`); a class count the task list disagrees with becomes a note."""
    src = Path(src)
    if not src.exists():
        raise EvalError(f"{src}: not found")
    found = "classification" if src.is_dir() else "retrieval"
    if kind is not None and kind not in KINDS:
        raise EvalError(f"--kind {kind}: one of {', '.join(KINDS)}")
    if kind is not None and kind != found:
        want = "a directory with one folder per class" if kind == "classification" else "a csv/tsv/parquet table"
        raise EvalError(f"{src}: --kind {kind} needs {want}")
    settings = check_task(task, out, found, tasks) if task is not None else None
    table_only, folder_only = ("image_column", "caption_column", "image_root"), ("classnames", "templates")
    if found == "classification":
        bad = [k for k in table_only if kw.get(k) is not None]
        if bad:
            raise EvalError(f"--{bad[0].replace('_', '-')} is for caption tables; {src} is a folder")
        res = export_folder(src, out, **{k: v for k, v in kw.items() if k not in table_only})
    else:
        bad = [k for k in folder_only if kw.get(k) is not None]
        if bad:
            raise EvalError(f"--{bad[0]} is for classification folders; {src} is a caption table")
        res = export_captions(src, out, **{k: v for k, v in kw.items() if k not in folder_only})
    if settings is not None:
        nc = settings.get("num_classes")
        if res.classes is not None and nc is not None and int(nc) != len(res.classes):
            res.notes.append(f"task {task} has {nc} classes in the task list, this set {len(res.classes)}: "
                             f"its scores are not comparable with DataComp's")
        if res.kind == "classification" and kw.get("templates") is None and not task.startswith("imagenet"):
            res.notes.append(f"templates: ImageNet's 80; DataComp's {task} set has its own (pass --templates FILE)")
    return res


def check_task(key: str, out: str | os.PathLike, kind: str, tasks: str | os.PathLike | None = None) -> dict:
    """The task list's settings of ``key``, after checking that the task exists, that its kind
    matches, and that OUT is where ``curate eval --data-dir DIR --task KEY`` looks (DIR = OUT's
    parent)."""
    tasklist = load_tasklist(tasks)
    if key not in tasklist:
        raise EvalError(f"--task {key!r} is not in the task list {tasks or TASKLIST} "
                        f"(add it to a task list YAML and pass --tasks)")
    task = tasklist[key]
    tkind = {"retrieval": "retrieval", "winogavil": "winogavil"}.get(task.get("task"), "classification")
    if tkind != kind:
        raise EvalError(f"--task {key}: the task is {tkind}, the input makes a {kind} set")
    out = Path(out)
    want, split = task_dir(out.resolve().parent, key)
    if split != "test":
        raise EvalError(f"--task {key}: a TiC task; write its set with `curate tic export`")
    if want.name != out.resolve().name:
        raise EvalError(f"{out}: `curate eval --task {key}` reads {want.name}/ under its --data-dir: "
                        f"name the output {out.parent / want.name}")
    return task
