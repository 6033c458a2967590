"""Representative and evaluation data, as named tensors.

A `data` stage materializes each dataset (an `.npz` file, a folder of images) or generator
(seeded synthetic inputs) once into `artifacts/data/<name>.npz`, checked for emptiness,
NaN/Inf and consistent sample counts. Model stages then draw a seeded subset of
`num_samples` from it, so every model and variant sees exactly the same samples, and
`bind` it to the model's signature: each input by name, dtype and shape checked.

Samples are keyed by tensor name. A short-form config (`inputs_key`, a generator's `shape`)
names no input: its array is stored under `ONLY` and feeds a model's only input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from pipeline.config import DataRef, DatasetConfig, DatasetType, Distribution, GeneratorConfig, TensorDtype
from pipeline.errors import InputError
from pipeline.io import read_npz, save_npz

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# The tensor name of a short-form config's array: the model's only input (or output, for labels).
ONLY = "*"
INPUT, LABEL = "input:", "label:"
# Images decode to this many pixels at most (a crafted PNG header can claim billions).
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
# A folder of images is held in memory as float32: at most this many values in all.
MAX_FOLDER_VALUES = 1 << 28


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as its signature declares it."""

    name: str
    shape: list  # None (or -1) for a dynamic dimension; the first is the batch
    dtype: str


@dataclass(frozen=True)
class Samples:
    """Model inputs by name (first axis = sample), with labels by output name.

    Integer (or boolean) labels are classes: a class index per sample, or 0/1 per unit of a
    one-unit or multi-label output; float labels are regression targets.
    """

    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0

    @property
    def sha256(self) -> str:
        """Hash of the exact arrays used, so provenance names the data, not a file."""
        digest = hashlib.sha256()
        for prefix, arrays in ((INPUT, self.inputs), (LABEL, self.labels)):
            for name in sorted(arrays):
                array = np.ascontiguousarray(arrays[name])
                digest.update(f"{prefix}{name}{array.shape}{array.dtype}".encode())
                digest.update(array.tobytes())
        return digest.hexdigest()

    def take(self, index: np.ndarray | slice) -> "Samples":
        return Samples({k: v[index] for k, v in self.inputs.items()}, {k: v[index] for k, v in self.labels.items()})

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """One sample as a batch of one, by input name."""
        return {name: array[index:index + 1] for name, array in self.inputs.items()}

    def batches(self, size: int) -> Iterable[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {name: array[start:start + size] for name, array in self.inputs.items()}


# --- materialization (the `data` stage) ---------------------------------------------------


def materialize(dataset: DatasetConfig | GeneratorConfig, *, key: str) -> Samples:
    if isinstance(dataset, GeneratorConfig):
        samples, file = generate(dataset), None
    elif dataset.type is DatasetType.npz:
        samples, file = _read_npz(dataset, key), dataset.path
    else:
        samples, file = _read_images(dataset, key), dataset.path
    counts = {len(array) if array.ndim else 0 for array in [*samples.inputs.values(), *samples.labels.values()]}
    for name, array in samples.inputs.items():
        where = _array_key(dataset, key, name, INPUT)
        if array.ndim == 0:
            raise InputError("a single value, not an array of samples", file=file, key=where)
        if array.dtype.kind not in "fiub":
            raise InputError(f"unsupported dtype {array.dtype}", file=file, key=where)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError("contains NaN or Inf values", file=file, key=where)
    for name, array in samples.labels.items():
        where = _array_key(dataset, key, name, LABEL)
        if array.ndim == 0 or array.dtype.kind not in "fiub":
            raise InputError(f"labels must be an array of class indices or numbers, not {array.dtype} of shape "
                             f"{array.shape}", file=file, key=where)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InputError("labels contain NaN or Inf values", file=file, key=where)
    if 0 in counts:
        raise InputError("dataset is empty", file=file, key=key)
    if len(counts) > 1:
        sizes = ", ".join(f"{_array_key(dataset, key, n, role)[len(key) + 1:]}: {len(a)}"
                          for role, arrays in ((INPUT, samples.inputs), (LABEL, samples.labels)) for n, a in arrays.items())
        raise InputError(f"arrays differ in their number of samples ({sizes})", file=file, key=key)
    return samples


def _array_key(dataset: DatasetConfig | GeneratorConfig, key: str, name: str, role: str) -> str:
    """The config key that names one array of a dataset, for messages."""
    if isinstance(dataset, GeneratorConfig):
        return key if name == ONLY else f"{key}.inputs.{name}"
    if role == INPUT:
        return f"{key}.inputs_key" if name == ONLY else f"{key}.inputs.{name}"
    return f"{key}.labels_key" if name == ONLY else f"{key}.labels.{name}"


def _read_npz(dataset: DatasetConfig, key: str) -> Samples:
    if not Path(dataset.path).is_file():
        raise InputError("no such file", file=dataset.path, key=f"{key}.path")
    inputs = dataset.inputs or {ONLY: dataset.inputs_key or ""}
    labels = dataset.labels or ({ONLY: dataset.labels_key} if dataset.labels_key else {})
    archive = read_npz(dataset.path, key=key, what=".npz")

    def array(name: str, array_key: str, role: str) -> np.ndarray:
        if array_key not in archive:
            raise InputError(f"no array '{array_key}' (has: {', '.join(archive) or 'none'})",
                             file=dataset.path, key=_array_key(dataset, key, name, role))
        return archive[array_key]

    return Samples({name: array(name, k, INPUT) for name, k in inputs.items()},
                   {name: array(name, k, LABEL) for name, k in labels.items()})


def _read_images(dataset: DatasetConfig, key: str) -> Samples:
    from PIL import Image

    root = Path(dataset.path)
    if not root.is_dir():
        raise InputError("image folder does not exist", file=str(root), key=f"{key}.path")
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if dataset.labels_key else []
    if dataset.labels_key and not classes:
        raise InputError("labels_key is set but the folder has no class sub-folders", file=str(root),
                         key=f"{key}.labels_key")
    files: list[tuple[Path, int]] = []
    for index, folder in enumerate(classes or [root]):
        files += [(f, index) for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    arrays, values = [], 0
    for file, _ in files:
        try:
            with Image.open(file) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{image.width}x{image.height} pixels is over the limit of {MAX_IMAGE_PIXELS:,}",
                                     file=str(file), key=key)
                image = image.convert("RGB")
                if dataset.image_size:
                    height, width = dataset.image_size
                    image = image.resize((width, height), Image.BILINEAR)
                values += image.width * image.height * 3
                if values > MAX_FOLDER_VALUES:
                    raise InputError(f"the folder's {len(files):,} images hold over {MAX_FOLDER_VALUES:,} values (1 GiB "
                                     "as float32): use fewer or smaller images (image_size)", file=str(root),
                                     key=f"{key}.path")
                arrays.append(np.asarray(image, dtype=np.float32) * dataset.scale)
        except (OSError, Image.DecompressionBombError) as exc:
            raise InputError(f"cannot read image: {exc}", file=str(file), key=key) from None
    if len({a.shape for a in arrays}) > 1:
        raise InputError("images differ in size: set image_size", file=str(root), key=f"{key}.image_size")
    inputs = np.stack(arrays) if arrays else np.zeros((0,), np.float32)
    labels = {ONLY: np.array([label for _, label in files], np.int64)} if classes else {}
    return Samples({ONLY: inputs}, labels)


def generate(generator: GeneratorConfig) -> Samples:
    """Seeded values for each input; inputs draw from one generator, in name order."""
    rng = np.random.default_rng(generator.seed)
    tensors = generator.inputs or {ONLY: generator}
    inputs = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        shape = (generator.size, *tensor.shape)
        if tensor.dtype is TensorDtype.bool:
            values = rng.integers(0, 2, size=shape).astype(bool)
        elif tensor.dtype is not TensorDtype.float32:
            values = rng.integers(int(np.ceil(tensor.low)), int(np.ceil(tensor.high)), size=shape)
            values = values.astype(tensor.dtype.value)
        elif tensor.distribution is Distribution.uniform:
            values = rng.uniform(tensor.low, tensor.high, size=shape).astype(np.float32)
        else:
            center, spread = (tensor.low + tensor.high) / 2, (tensor.high - tensor.low) / 4
            values = rng.normal(center, spread, size=shape).astype(np.float32)
        inputs[name] = values
    return Samples(inputs)


def save(samples: Samples, handle) -> None:
    save_npz(handle, {**{INPUT + k: v for k, v in samples.inputs.items()},
                      **{LABEL + k: v for k, v in samples.labels.items()}})


# --- consumption (evaluate, quantize, validate) ------------------------------------------


def read(path: str | Path, *, key: str) -> Samples:
    archive = read_npz(path, key=key, what="samples")
    inputs = {k[len(INPUT):]: v for k, v in archive.items() if k.startswith(INPUT)}
    labels = {k[len(LABEL):]: v for k, v in archive.items() if k.startswith(LABEL)}
    if not inputs:
        raise InputError("holds no input arrays: materialize it again", file=str(path), key=key)
    return Samples(inputs, labels)


def digests(samples: Samples) -> set[bytes]:
    """One digest per sample, of all its inputs: equal samples, equal digests."""
    names = sorted(samples.inputs)
    return {hashlib.sha256(b"".join(np.ascontiguousarray(samples.inputs[n][i]).tobytes() for n in names)).digest()
            for i in range(len(samples))}


def shuffled(samples: Samples, seed: int) -> Samples:
    """All samples in a seeded order: any prefix of it is a seeded random subset."""
    return samples.take(np.random.default_rng(seed).permutation(len(samples)))


def first(samples: Samples, count: int, *, key: str, file: str | None = None) -> Samples:
    if len(samples) < count:
        raise InputError(f"has {len(samples)} samples, fewer than the {count} requested", file=file, key=key)
    return samples.take(slice(0, count))


def draw(path: str | Path, ref: DataRef, *, key: str) -> Samples:
    """`ref.num_samples` samples, a seeded subset of a materialized dataset."""
    return first(shuffled(read(path, key=key), ref.seed), ref.num_samples, key=f"{key}.num_samples", file=str(path))


def bind(samples: Samples, inputs: list[TensorInfo], outputs: list[TensorInfo], *, key: str,
         file: str | None = None) -> Samples:
    """The samples keyed by the model's own input and output names, each input in the model's
    dtype. Fails (naming `key`, the dataset's config key) when an input has no array, an array
    feeds no input, or an array cannot feed its input (shape, dtype, integer range)."""
    named_inputs = _by_name(samples.inputs, [t.name for t in inputs], role="input", key=f"{key}.inputs", file=file)
    named_labels = _by_name(samples.labels, [t.name for t in outputs], role="output", key=f"{key}.labels", file=file,
                            complete=False)
    for name, labels in named_labels.items():
        shape = next((list(t.shape) for t in outputs if t.name == name), None)
        classes = shape[-1] if shape else None
        dims = shape[1:] if shape else None
        units = int(np.prod(dims)) if dims is not None and all(d and d > 0 for d in dims) else None
        where = f"{key}.labels_key" if ONLY in samples.labels else f"{key}.labels.{name}"
        if labels.dtype.kind not in "iub" or not labels.size:
            continue  # regression targets
        per_sample = labels.reshape(len(labels), -1).shape[1]
        if per_sample > 1 or units == 1:  # multi-hot rows, or a one-unit (binary) output's 0/1
            if per_sample > 1 and units not in (None, per_sample):
                raise InputError(f"{per_sample} labels per sample for the {units} units of output '{name}': "
                                 "multi-label rows have one 0/1 label per unit", file=file, key=where)
            if not np.isin(labels, (0, 1)).all():
                raise InputError(f"labels {int(labels.min())}..{int(labels.max())} for output '{name}', which has "
                                 f"{'one unit' if per_sample == 1 else 'a unit per label'}: 0 or 1 expected "
                                 "(store regression targets as floats)", file=file, key=where)
        elif classes not in (None, -1) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise InputError(f"class labels {int(labels.min())}..{int(labels.max())} for the {classes} classes of "
                             f"output '{name}'", file=file, key=where)
    specs = {t.name: t for t in inputs}
    short = ONLY in samples.inputs  # the config's inputs_key names the array
    return Samples({name: conform(array, specs[name], key=f"{key}.inputs_key" if short else f"{key}.inputs.{name}",
                                  file=file)
                    for name, array in named_inputs.items()}, named_labels)


def _by_name(arrays: Mapping[str, np.ndarray], names: list[str], *, role: str, key: str, file: str | None,
             complete: bool = True) -> dict[str, np.ndarray]:
    if ONLY in arrays:
        if len(names) != 1:
            raise InputError(f"the model has {len(names)} {role}s ({', '.join(names)}): name the array of each in "
                             f"{key.rsplit('.', 1)[-1]} (<{role} name>: <array key>)", file=file, key=key)
        return {names[0]: arrays[ONLY]}
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise InputError(f"the model has no {role} '{unknown[0]}' (its {role}s: {', '.join(names)})", file=file,
                         key=f"{key}.{unknown[0]}")
    missing = [name for name in names if name not in arrays]
    if complete and missing:
        raise InputError(f"no array for the model's {role} '{missing[0]}'", file=file, key=key)
    return {name: arrays[name] for name in names if name in arrays}


def conform(array: np.ndarray, spec: TensorInfo, *, key: str, file: str | None = None) -> np.ndarray:
    """`array` (samples of one input) in the input's dtype, or an error saying why it cannot be.

    Integer samples may feed float inputs (e.g. 8-bit pixels); float samples never feed
    integer inputs (token ids are not rounded); integer values must fit the input's type.
    """
    sample_shape, expected = tuple(array.shape[1:]), tuple(spec.shape[1:])
    if len(sample_shape) != len(expected) or any(e not in (None, -1, s) for e, s in zip(expected, sample_shape)):
        raise InputError(f"samples of shape {sample_shape}, the model input '{spec.name}' expects {expected}",
                         file=file, key=key)
    wanted = np.dtype(spec.dtype)
    have = array.dtype
    if wanted.kind == "f":
        if have.kind not in "fiu":
            raise InputError(f"samples are {have}, the model input '{spec.name}' is {wanted}", file=file, key=key)
        return array.astype(wanted, copy=False)
    if have.kind not in "iub":
        raise InputError(f"samples are {have}, the model input '{spec.name}' is {wanted}: integer and bool inputs "
                         "take integer samples, never rounded floats", file=file, key=key)
    if array.size:
        low, high = (0, 1) if wanted.kind == "b" else (np.iinfo(wanted).min, np.iinfo(wanted).max)
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest > high:
            raise InputError(f"values {smallest}..{largest} do not fit the model input '{spec.name}' ({wanted})",
                             file=file, key=key)
    return array.astype(wanted, copy=False)
