"""Videos of different lengths in one batch (`config.video_fps`): which frames of `pixel_values_videos` are real.

With a frame rate, each video keeps the frames the rate gives over its length (at most `video_num_frames`, in
whole time steps: `MediaTokenLayout.video_frame_count`), so the processor zero-pads `pixel_values_videos` to the
longest video of the call and says how many frames of each are real in `video_frames` (n_videos,). Only the real
frames go through the vision tower; a video's tokens follow its own count (`MediaTokenLayout.video_token_steps`).
Without a rate (the default) every video has exactly `video_num_frames` frames and `video_frames` is not needed.
"""

from __future__ import annotations

import torch


def video_frame_counts(layout, pixel_values_videos: torch.Tensor, video_frames: torch.Tensor | None) -> list[int]:
    """Real frames of each video (all of `pixel_values_videos`' frames without `video_frames`), each checked."""
    n, padded = pixel_values_videos.shape[:2]
    counts = [padded] * n if video_frames is None else [int(count) for count in video_frames.reshape(-1).tolist()]
    if len(counts) != n:
        raise ValueError(f"video_frames has {len(counts)} entries but pixel_values_videos holds {n} videos; give one count per video")
    for index, count in enumerate(counts):
        if count > padded:
            raise ValueError(f"video {index}: video_frames says {count} frames but pixel_values_videos holds {padded} per video")
        try:
            layout.check_video_frames(count)
        except ValueError as err:
            raise ValueError(f"pixel_values_videos, video {index}: {err} (the processor samples what the model takes)") from None
    return counts


def real_frames(pixel_values_videos: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(n, frames, 3, H, W) -> (sum(counts), 3, H, W): each video's first `counts[i]` frames, video after video."""
    if all(count == pixel_values_videos.shape[1] for count in counts):
        return pixel_values_videos.flatten(0, 1)
    return torch.cat([video[:count] for video, count in zip(pixel_values_videos, counts)])


__all__ = ["real_frames", "video_frame_counts"]
