"""M3DDM+ fine-tuning (the paper, section 4.1): start from the M3DDM release, Adam lr 1e-5, 16-frame clips,
16 global frames, uniform masks (four 0.30 / two 0.55 / one 0.15, width ratio U[0.15, 0.75]).

    python train.py --config configs/m3ddm_plus.py --config.data.dir=VIDEOS --workdir runs/m3ddm_plus

Every field can be overridden: ``--config.optim.lr=2e-5 --config.train.batch_size=32 --config.mesh.shape.fsdp=8``.
The reference code's variants: ``--config.mask.preset=code`` (single 0.30 / bi 0.55 / four 0.15),
``--config.optim.name=adamw`` (weight decay 0.01), ``--config.train.batch_size=1 --config.train.grad_accum=16``.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "m3ddm_plus"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.init = "m3ddm"                    # U-Net to start from: folder, hub id, 'm3ddm' / 'm3ddm+'; '' = random
    c.model.unet_config = ""                  # config.json (or a U-Net folder) for a random init (init = '')
    c.model.vae = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # frozen VAE: folder or hub id (subfolder vae)
    c.model.compute_dtype = "float32"         # 'bfloat16': bf16 compute, fp32 master weights
    c.model.vae_compute_dtype = "float32"
    c.model.remat = False                     # rematerialise each ResNet/transformer (memory)
    c.model.attention_impl = "xla"            # 'xla' | 'dot_product' | 'cudnn'
    c.model.attention_budget_mib = 128.0
    c.model.batchnorm = "per_video"           # global-encoder BN: 'per_video' (reference) | 'batch' | 'frozen'

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""                           # DIR/train, DIR/val (videos found recursively)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.num_frames = 16
    c.data.num_global_frames = 16
    c.data.size = 128                         # clip crop size (the reference's default; 256 = inference size)
    c.data.global_size = 128
    c.data.max_stride = 30
    c.data.min_frames = 16
    c.data.crop_scale = (0.08, 1.0)
    c.data.crop_ratio = (3 / 4, 4 / 3)
    c.data.global_crop = False                # True: global frames use the clip's crop box
    c.data.max_retries = 8                    # unreadable videos replaced per element before giving up
    c.data.cache_dir = ""                     # per-video index (global frames + keyframes): later epochs decode
                                              # only the clip; ~0.8 MB per video at 16 x 128 px. "" = off
    c.data.worker_count = 8
    c.data.worker_buffer_size = 2

    c.mask = ml_collections.ConfigDict()
    c.mask.mode = "uniform"                   # 'uniform' (M3DDM+) | 'per_frame' (M3DDM)
    c.mask.preset = "paper"                   # 'paper' | 'code' | '' (use mask.probs)
    c.mask.probs = (0.30, 0.55, 0.15)         # four / two / one sided (uniform); 5 values for per_frame
    c.mask.width_range = (0.15, 0.75)
    c.mask.frame_case_probs = (0.30, 0.35, 0.35)  # all masked / first+last revealed / each revealed w.p. p_frame
    c.mask.p_frame = 0.5
    c.mask.drop_local = 0.0                   # unconditional local condition (black frames, all-ones mask)
    c.mask.drop_global = 0.0                  # unconditional global condition (zero global latents)
    c.mask.mask_global = False                # mask the global frames with the clip's spatial mask (-1)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16                   # global batch (clips per step, all hosts)
    c.train.grad_accum = 1                    # micro-steps per optimizer update
    c.train.steps = 3125                      # 5 epochs of 10,000 videos at batch 16
    c.train.loss = "all"                      # 'all' (reference) | 'masked'
    c.train.repeat_noise = False              # debug: reuse step 0's masks/t/noise every step (overfit check)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"                     # 'adam' (paper) | 'adamw' (reference code, weight decay 0.01)
    c.optim.lr = 1e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01               # adamw only
    c.optim.clip_norm = 0.0                   # 0 = no clipping
    c.optim.warmup_steps = 0
    c.optim.ema_decay = 0.0                   # 0 = no EMA

    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = ("data", "fsdp")
    c.mesh.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = (("batch", ("data", "fsdp")), ("shard", ("fsdp",)))
    c.sharding.min_shard_elements = 0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 500
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every = 10
    c.log.tensorboard = True

    c.val = ml_collections.ConfigDict()
    c.val.every = 500                         # 0 = never; also run once before training when > 0
    c.val.batches = 8
    c.val.batch_size = 0                      # 0 = train.batch_size

    c.preview = ml_collections.ConfigDict()
    c.preview.every = 0                       # outpaint a val video every N steps (0 = off)
    c.preview.ratio = ""                      # '' = the ground truth's own W:H
    c.preview.crop_ratio = 0.25               # horizontal crop of the ground truth, outpainted back
    c.preview.frames = 16
    c.preview.steps = 50
    c.preview.output_size = 128
    c.preview.metrics = True                  # PSNR/SSIM/MSE through m3ddm_jax.metrics

    c.export = ml_collections.ConfigDict()
    c.export.at_end = True                    # write WORKDIR/export/unet (PyTorch layout) when training ends
    c.export.format = "safetensors"
    c.export.dtype = "float16"                # the release's dtype
    c.export.use_ema = True
    return c
