"""How many LM tokens one media item becomes: the single source of truth.

The processor expands each `<image>`/`<audio>`/`<video>` placeholder with these counts and the model
checks the placeholders it receives against the features it produces with the very same functions,
so the two can never drift apart (the LLaVA / Qwen2-Audio "tokens: X, features: Y" class of bugs).

`MediaTokenLayout` holds only plain numbers, so it is saved inside the processor config as a dict
and rebuilt from the model config with `MediaTokenLayout.from_config(config)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from transformers.image_processing_utils import select_best_resolution

from .media_registry import MODALITIES  # noqa: F401  (re-exported: the processor reads it from here)

# Vision towers whose sequence starts with a CLS token (SigLIP has none).
VISION_TOWERS_WITH_CLS = {"clip_vision_model", "vit", "dinov2"}
# Whisper-style audio encoders: conv(stride 1) -> conv(stride 2) -> transformer over `max_source_positions`.
AUDIO_CONV_STRIDE = 2


def tile_grids(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) grid of at most `max_tiles` crops, rows first (the order ties are broken in)."""
    return [(rows, cols) for rows in range(1, max_tiles + 1) for cols in range(1, max_tiles // rows + 1)]


def best_tile_grid(height: int, width: int, tile_size: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of `tile_size` crops that fit a `height` x `width` image best: LLaVA-NeXT's rule
    (`select_best_resolution`): the most image pixels kept when the image is scaled into the grid's canvas, then the
    least canvas wasted. An image no larger than one crop gets (1, 1); a wide one more columns, a tall one more rows."""
    if height < 1 or width < 1:
        raise ValueError(f"an image must be at least 1x1 pixels to be tiled, got {width}x{height}")
    candidates = [(rows * tile_size, cols * tile_size) for rows, cols in tile_grids(max_tiles)]
    best_height, best_width = select_best_resolution((height, width), candidates)
    return best_height // tile_size, best_width // tile_size


def frames_at_rate(rate_frames: int, max_frames: int, multiple: int) -> int:
    """Frames kept of a video sampled at a rate that gives `rate_frames` frames: at most `max_frames`, rounded down to
    a whole number of `multiple`-frame time steps, and at least one step (a shorter video repeats frames)."""
    return max(multiple, min(rate_frames, max_frames) // multiple * multiple)


def _ceil_div(numerator, denominator):
    """Ceiling division that works on ints and integer tensors alike."""
    return (numerator + denominator - 1) // denominator


@dataclass(frozen=True)
class MediaTokenLayout:
    """Plain numbers that decide the token count of each media item."""

    image_grid: int | None = None  # patches per side of the vision tower
    image_has_cls: bool = False
    image_keep_cls: bool = False  # vision_feature_select_strategy == "full"
    image_pool_stride: int = 1
    image_newline: bool = False  # a row-end token after each row of an image's pooled grid
    image_size: int | None = None  # pixels per side of one crop the vision tower takes
    image_max_tiles: int = 0  # 0: one crop per image; N: a grid of up to N crops plus a global view
    audio_max_positions: int | None = None  # encoder positions after the conv stem (Whisper: 1500)
    audio_pool_stride: int = 1
    video_num_frames: int = 0  # frames per video; with video_fps, the most a video keeps
    video_fps: float | None = None  # None: every video is video_num_frames frames; a rate: frames follow the length
    video_timestamps: bool = False  # "<t=1.5s>" text before each time step's tokens (the processor writes it)
    video_temporal_pool_stride: int = 1
    video_spatial_pool_stride: int = 1

    @classmethod
    def from_config(cls, config) -> "MediaTokenLayout":
        layout = {}
        if config.vision_config is not None:
            vision = config.vision_config
            has_cls = vision.model_type in VISION_TOWERS_WITH_CLS
            layout.update(
                image_grid=vision.image_size // vision.patch_size,
                image_has_cls=has_cls,
                image_keep_cls=has_cls and config.vision_feature_select_strategy == "full",
                image_pool_stride=config.image_pool_stride,
                image_newline=config.image_newline,
                image_size=vision.image_size,
                image_max_tiles=config.image_max_tiles,
                video_num_frames=config.video_num_frames if config.video_token_id is not None else 0,
                video_fps=config.video_fps,
                video_timestamps=config.video_timestamps,
                video_temporal_pool_stride=config.video_temporal_pool_stride,
                video_spatial_pool_stride=config.video_spatial_pool_stride,
            )
        if config.audio_config is not None:
            layout.update(
                audio_max_positions=config.audio_config.max_source_positions,
                audio_pool_stride=config.audio_pool_stride,
            )
        return cls(**layout)

    @classmethod
    def from_dict(cls, values: dict) -> "MediaTokenLayout":
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    # --- the counts -------------------------------------------------------------------------------
    def image_grid_side(self) -> int:
        """Tokens per side of an image's pooled patch grid."""
        if self.image_grid is None:
            raise ValueError("This model has no vision tower, so it takes no images.")
        return self.image_grid // self.image_pool_stride

    def image_grid_tokens(self) -> int:
        """The projector's tokens for one image: the pooled patch grid, plus CLS when the "full" strategy keeps it."""
        side = self.image_grid_side()
        return side * side + int(self.image_keep_cls)

    def crop_tokens(self) -> int:
        """Tokens for one crop the tower sees: `image_grid_tokens`, plus a row-end token per grid row with `image_newline`."""
        return self.image_grid_tokens() + (self.image_grid_side() if self.image_newline else 0)

    def image_tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the crops a `height` x `width` image is tiled into (`best_tile_grid`; needs tiling on)."""
        if not self.image_max_tiles:
            raise ValueError("This model does not tile images (image_max_tiles=0): every image is one crop.")
        return best_tile_grid(height, width, self.image_size, self.image_max_tiles)

    def image_crops(self, grid: tuple[int, int] | None = None) -> int:
        """Crops the tower runs for one image: 1 untiled; with a (rows, cols) grid, the global view plus rows * cols
        tiles, or the global view alone for a (1, 1) grid (its one tile would be the same picture)."""
        if not self.image_max_tiles:
            if grid is not None and tuple(grid) != (1, 1):
                raise ValueError(f"This model does not tile images (image_max_tiles=0), but got a {tuple(grid)} tile grid.")
            return 1
        if grid is None:
            raise ValueError("This model tiles images (image_max_tiles > 0): an image's token count needs its tile grid.")
        rows, cols = (int(n) for n in grid)
        if rows < 1 or cols < 1 or rows * cols > self.image_max_tiles:
            raise ValueError(f"tile grid {rows}x{cols} is outside 1..image_max_tiles={self.image_max_tiles} crops")
        return 1 if rows * cols == 1 else 1 + rows * cols

    def image_tokens(self, grid: tuple[int, int] | None = None) -> int:
        """Tokens for one image in the LM. Untiled: `crop_tokens`. Tiled (`grid` = (rows, cols)): each crop's
        `crop_tokens` after one marker token naming the crop (the global view first, then the tiles row by row)."""
        if not self.image_max_tiles:
            self.image_crops(grid)  # refuses a grid other than (1, 1)
            return self.crop_tokens()
        return self.image_crops(grid) * (1 + self.crop_tokens())

    def max_audio_mel_frames(self) -> int:
        """Longest clip, in mel frames, the audio encoder accepts (Whisper: 3000 = 30 s)."""
        if self.audio_max_positions is None:
            raise ValueError("This model has no audio tower, so it takes no audio.")
        return self.audio_max_positions * AUDIO_CONV_STRIDE

    def audio_encoder_positions(self, num_mel_frames):
        """Encoder positions for a clip of `num_mel_frames` (int or integer tensor), before pooling."""
        if self.audio_max_positions is None:
            raise ValueError("This model has no audio tower, so it takes no audio.")
        positions = _ceil_div(num_mel_frames, AUDIO_CONV_STRIDE)
        if hasattr(positions, "clamp"):
            return positions.clamp(max=self.audio_max_positions)
        return min(positions, self.audio_max_positions)

    def audio_tokens(self, num_mel_frames):
        """Tokens for one clip: its length follows the clip (never padded to 30 s), capped by the encoder."""
        return _ceil_div(self.audio_encoder_positions(num_mel_frames), self.audio_pool_stride)

    def video_tokens_per_step(self) -> int:
        """Frame tokens of one video time step (a temporally pooled frame): its spatially pooled patch grid."""
        if self.image_grid is None or self.video_num_frames == 0:
            raise ValueError("This model takes no video (it needs a vision tower and a video token).")
        side = self.image_grid // self.video_spatial_pool_stride
        return side * side

    def video_frame_count(self, rate_frames: int | None = None) -> int:
        """Frames one video keeps: `video_num_frames`; with `video_fps`, `frames_at_rate` of the `rate_frames` frames
        the rate gives over the video's length (bounded by `video_num_frames`, whole time steps)."""
        if self.video_fps is None or rate_frames is None:
            return self.video_num_frames
        return frames_at_rate(rate_frames, self.video_num_frames, self.video_temporal_pool_stride)

    def check_video_frames(self, num_frames: int) -> None:
        """Refuse a frame count this layout cannot produce (naming it and the rule)."""
        stride, most = self.video_temporal_pool_stride, self.video_num_frames
        if self.video_fps is None and num_frames != most:
            raise ValueError(f"a video has {num_frames} frames; this model takes exactly video_num_frames={most}")
        if num_frames < 1 or num_frames > most or num_frames % stride:
            raise ValueError(
                f"a video has {num_frames} frames; this model takes 1..{most} (video_num_frames) in whole time steps of "
                f"video_temporal_pool_stride={stride} frames"
            )

    def video_token_steps(self, track_mel_frames: int = 0, num_frames: int | None = None) -> list[tuple[int, int]]:
        """(frame tokens, sound-track tokens) of each temporal step of one video, in the order the LM reads them.

        A video of `num_frames` frames (default `video_num_frames`; with `video_fps` each video's own count,
        `video_frame_count`) is `num_frames // video_temporal_pool_stride` temporal steps of pooled frame tokens. With its
        sound track (`use_audio_in_video`, `track_mel_frames` > 0 log-mel frames, fitted by the processor to the
        frames' span) the track's `audio_tokens` are cut into as many equal time windows, and each step's frame
        tokens are followed by the tokens of its window: audio token j (of A) lands in window floor(j * steps / A),
        so window i holds ceil((i + 1) * A / steps) - ceil(i * A / steps) tokens. Without a track (0) every step
        has 0 audio tokens.
        """
        per_step = self.video_tokens_per_step()
        num_frames = self.video_num_frames if num_frames is None else int(num_frames)
        self.check_video_frames(num_frames)
        steps = num_frames // self.video_temporal_pool_stride
        track = self.audio_tokens(track_mel_frames) if track_mel_frames else 0
        return [(per_step, _ceil_div((i + 1) * track, steps) - _ceil_div(i * track, steps)) for i in range(steps)]

    def video_tokens(self, track_mel_frames: int = 0, num_frames: int | None = None) -> int:
        """Placeholder tokens for one video of `num_frames` frames (default `video_num_frames`) after temporal and
        spatial pooling, plus its sound track's tokens when it comes with one (`track_mel_frames` > 0, see
        `video_token_steps`). `video_timestamps` text between the steps is text, not placeholders: not counted here."""
        return sum(frames + audio for frames, audio in self.video_token_steps(track_mel_frames, num_frames))
