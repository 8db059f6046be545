"""MultimodalImageProcessor: CLIP-style image preprocessing on numpy / PIL / torch, no torchvision.

transformers v5's fast image processors need torchvision, which this package does not install. This
one reproduces `CLIPImageProcessorPil` (resize the shortest edge with PIL, center crop, rescale,
normalise) to within float32 rounding, and differs from it in three ways:

- every input form is first turned into one canonical array, an RGB `uint8` (H, W, 3) image, so a
  path, bytes, a PIL image, a numpy array and a torch tensor of the same picture give the same
  tensor bit for bit;
- only the resize runs per image (PIL's resampling, which the parity with CLIP needs); crop is a
  slice, and rescale + normalise run once, fused, on the stacked `(batch, 3, H, W)` tensor;
- bad inputs raise `MediaInputError` (a `ValueError`) that names the item and the file.

Channel handling (documented, tested): grayscale (1 channel) is repeated to RGB; grayscale+alpha
(2 channels) and RGBA (4 channels) are composited onto a white background. Files, bytes and PIL images
are turned upright by their EXIF orientation (as `transformers.image_utils.load_image` does, so phone
photos are not sideways), and 16-bit PIL images (modes `I;16*` and `I`, e.g. 16-bit grayscale PNGs) are
scaled from [0, 65535] to [0, 255] rather than clipped. Numpy arrays are read as
(H, W, C) unless only the first axis looks like channels; torch tensors as (C, H, W) unless only the
last axis does. Float arrays must hold values in [0, 1] (scaled by 255 and rounded) or whole numbers
in [0, 255].
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from .image_tiling import tile_image
from .media_files import open_media_file

# Images above this many pixels are refused before they are decoded (about 67 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26


class MediaInputError(ValueError):
    """A media item that cannot be used. `index` is its position in the flat list the component was given."""

    def __init__(self, kind: str, index: int, message: str):
        self.kind, self.index, self.detail = kind, index, message
        super().__init__(f"{kind} {index}: {message}")


def describe(item) -> str:
    """Short description of a media item for error messages (the file name when there is one)."""
    if isinstance(item, (str, os.PathLike)):
        return f"file {os.fspath(item)!r}"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"{len(item)} bytes"
    shape = getattr(item, "shape", None)
    return f"{type(item).__name__}{tuple(shape) if shape is not None else ''}"


# --- loading: any input form -> RGB uint8 (H, W, 3) ------------------------------------------------
def _composite_on_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend `color` (H, W, C) uint8 over white with `alpha` (H, W, 1) uint8, like transformers' convert_to_rgb."""
    alpha = alpha.astype(np.float32) / 255.0
    return np.round(alpha * color + (1.0 - alpha) * 255.0).astype(np.uint8)


def _hwc_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in 1..4 -> (H, W, 3) uint8."""
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 2:  # grayscale + alpha
        return np.repeat(_composite_on_white(array[..., :1], array[..., 1:]), 3, axis=-1)
    if channels == 3:
        return np.ascontiguousarray(array)
    return _composite_on_white(array[..., :3], array[..., 3:])  # RGBA


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values as uint8: floats in [0, 1] are scaled by 255 and rounded; whole numbers must be in [0, 255]."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        raise ValueError("the image is empty")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low >= 0.0 and high <= 1.0:
            return np.round(array.astype(np.float32) * 255.0).astype(np.uint8)
        if low >= 0.0 and high <= 255.0 and np.array_equal(array, np.round(array)):
            return array.astype(np.uint8)
        raise ValueError(f"float pixel values must be in [0, 1] (or whole numbers in [0, 255]); got [{low}, {high}]")
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"integer pixel values must be in [0, 255]; got [{low}, {high}] ({array.dtype})")
        return array.astype(np.uint8)
    raise ValueError(f"unsupported pixel dtype {array.dtype}")


def _array_to_rgb(array: np.ndarray, channels_first: bool) -> np.ndarray:
    """2-D or 3-D array -> RGB uint8 (H, W, 3). `channels_first` is the preferred reading when ambiguous."""
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        first, last = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first and (channels_first or not last):
            array = np.moveaxis(array, 0, -1)
        elif not last:
            raise ValueError(f"expected (H, W, C) or (C, H, W) with C in 1..4 channels, got shape {array.shape}")
    else:
        raise ValueError(f"expected a 2-D or 3-D image array, got shape {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"the image is empty (shape {array.shape})")
    return _hwc_to_rgb(_to_uint8(array))


# PIL modes holding one channel of 16-bit samples ("I" is 32-bit signed; 16-bit TIFFs and, in older Pillow, PNGs
# open as it).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EXIF_ORIENTATION = 0x0112


def _sixteen_bit_to_uint8(image: PIL.Image.Image) -> np.ndarray:
    """A 16-bit single-channel image -> (H, W, 1) uint8, [0, 65535] scaled (and rounded) to [0, 255]."""
    array = np.asarray(image).astype(np.int64).reshape(image.height, image.width, 1)
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 65535:
        raise ValueError(f"mode {image.mode} pixel values must be in [0, 65535] (16-bit); got [{low}, {high}]")
    return ((array * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """PIL image -> RGB uint8 (H, W, 3), going through the same numpy code as arrays (so alpha blends identically)."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return _hwc_to_rgb(np.asarray(image).reshape(image.height, image.width, -1))
    if image.mode in SIXTEEN_BIT_MODES:
        return _hwc_to_rgb(_sixteen_bit_to_uint8(image))
    if image.mode == "F":  # float samples: the same rules as float arrays
        return _hwc_to_rgb(_to_uint8(np.asarray(image).reshape(image.height, image.width, 1)))
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    return _pil_to_rgb(image.convert("RGBA" if has_alpha else "RGB"))


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image turned by its EXIF orientation tag (the image itself when it has none)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
        return image
    return PIL.ImageOps.exif_transpose(image)


def check_pixels(height: int, width: int, max_pixels: int | None, what: str = "the image") -> None:
    """Refuse `what` when height * width > max_pixels (`None`: no limit), naming the size and the limit."""
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"{what} is {width}x{height} = {height * width} pixels, above max_image_pixels={max_pixels}; "
            "downscale it first or raise max_image_pixels"
        )


def _open_image(source, name: str, max_pixels: int | None) -> np.ndarray:
    """Decode an image file (path or bytes); the size is checked from the header, before decoding."""
    if isinstance(source, str):
        source = open_media_file(source, name)  # regular files only; a FIFO never blocks
    try:
        with source, PIL.Image.open(source) as image:
            check_pixels(image.height, image.width, max_pixels)
            image.load()
            return _pil_to_rgb(_upright(image))
    except PIL.Image.DecompressionBombError as err:
        raise ValueError(f"{name} is too large to decode safely ({err})") from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot read {name} as an image: {err}") from err


def load_image(item, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Any supported image form -> RGB uint8 (H, W, 3). Raises `ValueError` describing the problem.

    Besides paths, bytes, PIL images and arrays: 🤗 Datasets' stored image form `{"bytes": ..., "path": ...}`, which
    a dataset yields for an image nested inside chat messages (TRL's GRPO prompts) or under `Image(decode=False)`.
    """
    if isinstance(item, dict) and {"bytes", "path"} >= set(item) and (item.get("bytes") or item.get("path")):
        item = item["bytes"] or item["path"]
    if isinstance(item, (str, os.PathLike)):
        return _open_image(os.fspath(item), describe(item), max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _open_image(io.BytesIO(bytes(item)), f"image bytes ({len(item)} bytes)", max_pixels)
    if isinstance(item, PIL.Image.Image):
        check_pixels(item.height, item.width, max_pixels)
        return _pil_to_rgb(_upright(item))
    if isinstance(item, torch.Tensor):
        item, channels_first = item.detach().cpu().numpy(), True
    elif isinstance(item, np.ndarray):
        channels_first = False
    else:
        raise ValueError(
            f"unsupported image type {type(item).__name__}; expected a path, bytes, PIL image, numpy array, torch tensor "
            "or a datasets image dict {'bytes': ..., 'path': ...}"
        )
    image = _array_to_rgb(item, channels_first)
    check_pixels(image.shape[0], image.shape[1], max_pixels)
    return image


# EXIF orientations that turn the picture by 90 degrees (its upright height is the stored width).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size_from_header(item) -> tuple[int, int]:
    """(height, width) of an image as `load_image` would return it (upright by its EXIF orientation), read from the
    file's header alone for paths and bytes; in-memory images are measured as loaded."""
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)):
        is_path = isinstance(item, (str, os.PathLike))
        source = open_media_file(os.fspath(item), describe(item)) if is_path else io.BytesIO(bytes(item))
        with source, PIL.Image.open(source) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS
    elif isinstance(item, PIL.Image.Image):
        width, height = item.size
        turned = item.getexif().get(EXIF_ORIENTATION, 1) in TRANSPOSING_ORIENTATIONS
    else:
        height, width = load_image(item, max_pixels=None).shape[:2]
        turned = False
    return (width, height) if turned else (height, width)


def flatten_images(images) -> list:
    """One image, a list, a per-sample list of lists, or a 4-D batch array/tensor -> flat list of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


# --- the pipeline on RGB uint8 arrays ---------------------------------------------------------------
def _output_size(image: np.ndarray, size: SizeDict) -> tuple[int, int]:
    """Target (height, width) for a resize, with the same arithmetic as transformers' PIL backend."""
    if size.shortest_edge and size.longest_edge:
        return get_size_with_aspect_ratio(image.shape[:2], size.shortest_edge, size.longest_edge)
    if size.shortest_edge:
        return get_resize_output_image_size(
            image, size=size.shortest_edge, default_to_square=False, input_data_format=ChannelDimension.LAST
        )
    if size.height and size.width:
        return size.height, size.width
    raise ValueError(f"size must have 'shortest_edge' (optionally 'longest_edge') or 'height' and 'width', got {size}")


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop an (H, W, 3) image, zero-padding it first if it is smaller (as transformers does)."""
    in_height, in_width = image.shape[:2]
    if in_height < height or in_width < width:
        padded = np.zeros((max(height, in_height), max(width, in_width), 3), dtype=image.dtype)
        top, left = (padded.shape[0] - in_height + 1) // 2, (padded.shape[1] - in_width + 1) // 2
        padded[top : top + in_height, left : left + in_width] = image
        image, in_height, in_width = padded, padded.shape[0], padded.shape[1]
    top, left = (in_height - height) // 2, (in_width - width) // 2
    return image[top : top + height, left : left + width]


def preprocess_rgb_arrays(
    images: Sequence[np.ndarray],
    do_resize: bool,
    size: SizeDict,
    resample,
    do_center_crop: bool,
    crop_size: SizeDict,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    image_mean,
    image_std,
) -> torch.Tensor:
    """RGB uint8 (H, W, 3) images -> float32 (batch, 3, height, width). Shared by the image and video processors."""
    resample = PILImageResampling.BILINEAR if resample is None else resample
    prepared = []
    for image in images:
        if do_resize:
            height, width = _output_size(image, size)
            if (height, width) != image.shape[:2]:
                image = np.asarray(PIL.Image.fromarray(image).resize((width, height), resample=resample))
        if do_center_crop:
            image = _center_crop(image, crop_size.height, crop_size.width)
        prepared.append(image)
    shapes = {image.shape for image in prepared}
    if len(shapes) > 1:
        raise ValueError(f"images end up with different sizes {sorted(shapes)}; enable do_center_crop or a fixed size")
    batch = torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2).float()  # (batch, 3, height, width)
    # rescale and normalise fused into one multiply-add: x * (factor / std) - mean / std
    scale = torch.full((3,), float(rescale_factor) if do_rescale else 1.0)
    shift = torch.zeros(3)
    if do_normalize:
        mean = torch.as_tensor(image_mean, dtype=torch.float64).expand(3)
        std = torch.as_tensor(image_std, dtype=torch.float64).expand(3)
        scale, shift = (scale.double() / std).float(), (-mean / std).float()
    return batch.mul_(scale.view(1, 3, 1, 1)).add_(shift.view(1, 3, 1, 1))


class MultimodalImagesKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus the pixel limit and the tiling bound."""

    max_image_pixels: int | None
    max_tiles: int | None


class MultimodalImageProcessor(BaseImageProcessor):
    r"""
    CLIP-style image processor without torchvision: resize (shortest edge, PIL), center crop, rescale, normalise.

    Defaults are CLIP's (224 px, OpenAI mean/std, bicubic). Saves and loads `preprocessor_config.json` like any
    transformers image processor. Accepts paths, bytes, PIL images, numpy arrays and torch tensors (see the module
    docstring for channel rules) and returns `pixel_values` float32 `(n_images, 3, crop_height, crop_width)`.

    Args:
        max_image_pixels (`int`, *optional*, defaults to 2**26): images with more pixels are refused with a
            `ValueError` (before decoding, for files); `None` disables the check.
        max_tiles (`int`, defaults to 0): 0 gives one crop per image. N > 0 tiles each image (`image_tiling.tile_image`):
            its global view and a grid of up to N crops of the crop size, no centre crop; `pixel_values` then holds
            every crop, image after image, and `image_tiles` (n_images, 2) each image's (rows, cols). The
            `MultimodalProcessor` sets it from the model's `image_max_tiles`.
        Other arguments: as `CLIPImageProcessor` (`size`, `crop_size`, `resample`, `do_*`, `image_mean`, `image_std`).
        `do_convert_rgb` is accepted for compatibility; outputs are always RGB since the vision tower needs 3 channels.
    """

    valid_kwargs = MultimodalImagesKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
    max_tiles = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    @property
    def backend(self) -> str:
        return "pil"

    def fetch_images(self, image_url_or_urls):
        """No network: paths and bytes are read in `load_image`, so inputs pass through unchanged."""
        return image_url_or_urls

    def _prepare_image_like_inputs(self, images, *args, max_image_pixels=None, **kwargs) -> list[np.ndarray]:
        """Load every image (any form) as RGB uint8 (H, W, 3); all are checked before any is transformed."""
        loaded = []
        for index, item in enumerate(flatten_images(images)):
            try:
                loaded.append(load_image(item, max_pixels=max_image_pixels))
            except ValueError as err:
                raise MediaInputError("image", index, str(err)) from err
        if not loaded:
            raise ValueError("no images were given")
        return loaded

    def _preprocess(self, images: list[np.ndarray], return_tensors=None, **kwargs) -> BatchFeature:
        names = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor")
        names += ("do_normalize", "image_mean", "image_std")
        options = {name: kwargs[name] for name in names}
        if not kwargs.get("max_tiles"):
            data = {"pixel_values": preprocess_rgb_arrays(images, **options)}
        else:
            data = self._tiled(images, kwargs["max_tiles"], options)
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def _tiled(self, images: list[np.ndarray], max_tiles: int, options: dict) -> dict:
        """`pixel_values` (every image's crops: global view, then tiles) and `image_tiles` (n_images, 2)."""
        tile = options["crop_size"] if options["do_center_crop"] else options["size"]
        if not (tile.height and tile.width) or tile.height != tile.width:
            raise ValueError(f"tiling needs a square crop size (the tower's), got {tile}")
        resample = PILImageResampling.BILINEAR if options["resample"] is None else options["resample"]
        crops, grids = [], []
        for image in images:
            image_crops, grid = tile_image(image, tile.height, max_tiles, resample)
            crops += image_crops
            grids.append(grid)
        options = {**options, "do_resize": False, "do_center_crop": False}  # the crops have the tower's size already
        return {"pixel_values": preprocess_rgb_arrays(crops, **options), "image_tiles": torch.tensor(grids, dtype=torch.long)}


__all__ = ["MultimodalImageProcessor", "MediaInputError", "image_size_from_header", "load_image", "preprocess_rgb_arrays"]
