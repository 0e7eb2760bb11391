"""Media: probing, windowing and frame sampling (the only video decoding), folder scans, previews, and
stitching reels with moviepy."""
