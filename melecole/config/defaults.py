"""The one commented default configuration tree.

Every key a yaml file or a command-line override may set lives here; anything else is an error.
Axis order is (z, y, x) for every size, offset, stride and padding. Use ``get_default_cfg()`` to get
a fresh mutable copy; never modify ``_C`` itself.
"""

from yacs.config import CfgNode as CN

_C = CN()

# --------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------
_C.HARDWARE = CN()
# Processes (one per GPU) launched by melecole/train_distributed.py; train.py always uses one.
_C.HARDWARE.NUM_GPUS = 1
# DataLoader worker processes per training process (0 = load in the main process).
_C.HARDWARE.NUM_WORKERS = 2
# auto: CUDA when available, else CPU. cpu | cuda force one.
_C.HARDWARE.DEVICE = "auto"
# Mixed precision (autocast + grad scaler). Only ever active on CUDA.
_C.HARDWARE.AMP = True
# torch CPU threads per process; 0 = auto: every usable core, divided among the local processes, at
# least 1 (DataLoader workers are not counted: they wait most of a step; bench/bench_train.py).
_C.HARDWARE.NUM_THREADS = 0
# Train with the model's weights in channels-last 3D memory format (the convolutions then run
# channels-last). Same values up to float rounding; speed depends on the patch and model shape:
# bench/bench_train.py --variants auto cl3d (bench/RESULTS.md, "Training speed"). Training only.
_C.HARDWARE.CHANNELS_LAST = False

# --------------------------------------------------------------------------------------------------
# Dataset: <DATA_ROOT>/<split>/*.hdf, every file one volume (see docs/ARCHITECTURE.md)
# --------------------------------------------------------------------------------------------------
_C.DATASET = CN()
_C.DATASET.DATA_ROOT = "dataset"
# Context around the labels in the raw volume, (z, y, x) per side. The raw shape must equal the
# label shape, or the label shape + 2 * PADDING.
_C.DATASET.PADDING = [0, 0, 0]
_C.DATASET.RAW_KEY = "volume"
_C.DATASET.LABEL_KEY = "labels"
_C.DATASET.TRAIN_SPLIT = "train"
_C.DATASET.VAL_SPLIT = "val"
# Folder of HDF5 volumes without labels for contrastive (MoCo) training; "" = none.
_C.DATASET.UNLABELED_DATA_ROOT = ""
# A training patch is redrawn when less than this fraction of its voxels carries a label != 0.
_C.DATASET.MIN_LABELED_FRACTION = 0.5
# ... at most this many times; then the last draw is used.
_C.DATASET.MAX_REDRAWS = 20
# Connected components are recomputed inside each patch; pieces smaller than this (voxels) are
# set to 0 (ignored) because their mean embedding is too noisy to be useful.
_C.DATASET.MIN_OBJECT_SIZE = 4
# Voxels within this many voxels of a different object are set to 0 in each training patch (after
# augmentation): the metric loss ignores them and the foreground head learns them as boundary.
# For dense ground truth without a boundary class (medulla); 0 = labels as given.
_C.DATASET.BOUNDARY_WIDTH = 0
# The ground truth's own boundary class (label 0) grows this many voxels into the objects in each
# training patch (after augmentation), for a boundary class thinner than the model can place
# (fib-gala's is one voxel); 0 = as given.
_C.DATASET.BACKGROUND_WIDTH = 0

# --------------------------------------------------------------------------------------------------
# Augmentation: each has ENABLED, a probability P and its strength parameters.
# --------------------------------------------------------------------------------------------------
_C.AUGMENTATION = CN()
_C.AUGMENTATION.ENABLED = True
# Random flips along z, y, x and a y<->x transpose (labels move exactly).
_C.AUGMENTATION.FLIP = CN({"ENABLED": True, "P": 1.0})
# In-plane rotation by a random multiple of 90 degrees.
_C.AUGMENTATION.ROTATE = CN({"ENABLED": True, "P": 1.0})
# Smooth random in-plane displacement field; ALPHA = max displacement (pixels), SIGMA = smoothness.
_C.AUGMENTATION.ELASTIC = CN({"ENABLED": True, "P": 0.5, "ALPHA": 6.0, "SIGMA": 8.0})
# Contrast / brightness / gamma, per section (2d) or for the whole patch (3d) at random.
_C.AUGMENTATION.GRAYSCALE = CN(
    {"ENABLED": True, "P": 0.75, "CONTRAST": 0.3, "BRIGHTNESS": 0.15, "GAMMA": 0.3}
)
# Whole sections replaced (blank or copy of a neighbour); labels unchanged.
_C.AUGMENTATION.MISSING_SECTION = CN({"ENABLED": True, "P": 0.15, "NUM_SECTIONS": 2})
# Blank or smeared regions inside single sections; SIZE = max fraction of a section side.
_C.AUGMENTATION.MISSING_PARTS = CN({"ENABLED": True, "P": 0.15, "SIZE": 0.3})
# Section misalignment: "slip" moves one section, "shift" moves all sections below one.
# DISPLACEMENT = max in-plane shift in pixels. Labels move with the raw.
_C.AUGMENTATION.MISALIGNMENT = CN({"ENABLED": True, "P": 0.3, "DISPLACEMENT": 8, "SLIP_RATIO": 0.5})
# Motion blur (line kernel) or defocus (gaussian) in a few sections.
_C.AUGMENTATION.MOTION_BLUR = CN({"ENABLED": True, "P": 0.15, "SECTIONS": 2, "KERNEL_SIZE": 9, "SIGMA": 2.0})
# Down- and up-sampling of a random region (cut-blur); DOWN_RATIO = (min, max) factor.
_C.AUGMENTATION.CUT_BLUR = CN({"ENABLED": True, "P": 0.3, "LENGTH_RATIO": 0.4, "DOWN_RATIO": [2.0, 6.0]})
# Additive gaussian noise with a standard deviation drawn up to STD (raw scaled to [0, 1]).
_C.AUGMENTATION.NOISE = CN({"ENABLED": True, "P": 0.3, "STD": 0.05})

# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Registry name (melecole.models.MODEL_REGISTRY).
_C.MODEL.ARCHITECTURE = "unet3d"
# Training patch size (z, y, x); the network's output has the same size.
_C.MODEL.INPUT_SIZE = [20, 128, 128]
_C.MODEL.IN_CHANNELS = 1
# Feature channels per UNet level; len(FILTERS) - 1 downsamplings.
_C.MODEL.FILTERS = [32, 64, 128, 256]
# Per downsampling step: pool z as well (True) or only in-plane (False). len = len(FILTERS) - 1.
_C.MODEL.POOL_Z = [False, False, True]
_C.MODEL.EMBEDDING_DIMENSION = 16
# batch | instance | group | none
_C.MODEL.NORM = "group"
_C.MODEL.NORM_GROUPS = 8
# relu | elu | leaky_relu | gelu
_C.MODEL.ACTIVATION = "elu"
# Anisotropic stem kernel (z, y, x).
_C.MODEL.STEM_KERNEL = [1, 5, 5]
# A third head, trained on local shape descriptors (LOSS.LSD_WEIGHT > 0, melecole.data.lsd); it is
# computed in training only (an evaluating network returns embedding and foreground).
_C.MODEL.LSD_HEAD = False

# --------------------------------------------------------------------------------------------------
# Loss: Lee et al. metric loss on the embedding + BCE on the foreground head
# --------------------------------------------------------------------------------------------------
_C.LOSS = CN()
# Distance used by the loss and by embeddings -> affinities: l1 | l2
_C.LOSS.NORM = "l2"
# Pull hinge: voxels closer than DELTA_V to their object mean cost nothing.
_C.LOSS.DELTA_V = 0.5
# Push hinge: object means further apart than 2 * DELTA_D cost nothing.
_C.LOSS.DELTA_D = 1.5
_C.LOSS.ALPHA = 1.0  # pull weight
_C.LOSS.BETA = 1.0  # push weight
_C.LOSS.GAMMA = 0.001  # weight of the regulariser on mean norms
_C.LOSS.FOREGROUND_WEIGHT = 1.0  # weight of BCE(foreground head, label != 0)
# Weight of the affinity term (melecole.losses.metric.affinity_loss_term): the embedding affinities
# of INFERENCE.OFFSETS, the ones the watershed reads, pushed to 1 (same id) / 0 (different ids),
# class-balanced. 0 = the plain discriminative loss.
_C.LOSS.AFFINITY_WEIGHT = 0.0
# Weight of the auxiliary local-shape-descriptor term (Sheridan et al. 2022): mean squared error of
# sigmoid(MODEL.LSD_HEAD) to the 10 descriptors of each labelled voxel, computed per augmented patch
# by the loader over a box window of LSD_RADIUS (z, y, x) voxels. 0 = off; > 0 needs MODEL.LSD_HEAD.
_C.LOSS.LSD_WEIGHT = 0.0
_C.LOSS.LSD_RADIUS = [8, 8, 8]

# --------------------------------------------------------------------------------------------------
# Optimisation (iteration based)
# --------------------------------------------------------------------------------------------------
_C.OPTIM = CN()
_C.OPTIM.OPTIMIZER = "adam"  # adam | adamw | sgd
_C.OPTIM.INITIAL_LR = 1e-3
_C.OPTIM.MIN_LR = 1e-6
_C.OPTIM.WEIGHT_DECAY = 0.0
_C.OPTIM.MOMENTUM = 0.9  # sgd only
_C.OPTIM.SCHEDULER = "cosine"  # cosine | constant | step
_C.OPTIM.WARMUP_ITER = 0
_C.OPTIM.STEP_SIZE = 10000  # step scheduler only
_C.OPTIM.STEP_GAMMA = 0.5  # step scheduler only
_C.OPTIM.TOTAL_ITER = 100000
# Patches per process and step.
_C.OPTIM.BATCH_SIZE = 2
# Clip the global gradient norm; 0 disables.
_C.OPTIM.GRAD_CLIP = 1.0

# --------------------------------------------------------------------------------------------------
# Momentum contrast (dense, voxel-level MoCo)
# --------------------------------------------------------------------------------------------------
_C.MOCO = CN()
_C.MOCO.ENABLED = False
# Dense voxel-level MoCo (melecole/models/moco.py): queries = online projections in view 1 of a
# crop, positive keys = momentum-network projections at the same voxels in view 2, negatives = a
# queue of earlier keys. Needs MODEL.NORM group | instance | none (batch norm leaks statistics).
# joint: metric loss + WEIGHT * InfoNCE, every step one labelled batch and one batch of view pairs.
# pretrain: InfoNCE only (labels not needed); fine-tune with train.py --ssl_checkpoint CKPT.
_C.MOCO.MODE = "joint"
_C.MOCO.WEIGHT = 0.1
_C.MOCO.MOMENTUM = 0.999
_C.MOCO.TEMPERATURE = 0.1
_C.MOCO.QUEUE_SIZE = 16384
_C.MOCO.PROJECTION_DIM = 32
_C.MOCO.PROJECTION_HIDDEN = 64
# Voxel locations sampled per view pair.
_C.MOCO.NUM_SAMPLES = 256
# Treat keys of the same labelled instance as positives where labels exist.
_C.MOCO.SUPERVISED = False
# What the projection head reads at each sampled voxel: "features" (decoder features, FILTERS[0]
# channels; the embedding head stays free for the metric loss) | "embedding" (the embedding itself).
_C.MOCO.PROJECTION_INPUT = "features"
# Largest relative offset (z, y, x) between the two views of a crop; the views overlap by at least
# MODEL.INPUT_SIZE - MAX_SHIFT voxels per axis (the region read is INPUT_SIZE + MAX_SHIFT).
_C.MOCO.MAX_SHIFT = [4, 16, 16]
# Random flips, y/x transpose and in-plane rot90 per view (their voxel mapping is tracked exactly).
# The views also get the enabled intensity / defect groups of AUGMENTATION.* (grayscale, noise,
# missing section/parts, motion blur, cut-blur), never the ones that move voxels.
_C.MOCO.SPATIAL_TRANSFORMS = True
# Also draw views from the labelled DATA_ROOT/TRAIN_SPLIT volumes (their labels feed SUPERVISED),
# besides DATASET.UNLABELED_DATA_ROOT.
_C.MOCO.USE_LABELED_VOLUMES = True
# Crops (view pairs) per process and step; 0 = OPTIM.BATCH_SIZE.
_C.MOCO.BATCH_SIZE = 0

# --------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------
_C.INFERENCE = CN()
_C.INFERENCE.OFFSETS = [
    [-1, 0, 0], [0, -1, 0], [0, 0, -1],
    [-2, 0, 0], [0, -5, 0], [0, 0, -5], [0, -5, -5], [0, -5, 5],
    [-1, -5, 0], [-1, 0, -5], [1, -5, 0], [1, 0, -5],
]
# Window size (z, y, x); empty (null) = MODEL.INPUT_SIZE; auto = planned per volume from its shape,
# the model's valid sizes and MEMORY_BUDGET_GB (melecole/inference/planner.py: the fewest computed
# voxels, larger windows preferred; a small volume is one window, windows spread evenly).
_C.INFERENCE.WINDOW_SIZE = None
# Step between windows (z, y, x); empty = from OVERLAP (with WINDOW_SIZE auto it must be empty).
_C.INFERENCE.STRIDE = []
# Voxels (whole numbers) or fraction of the window (< 1) that consecutive windows share, per axis
# (z, y, x); at least 2 * MARGIN + the largest |offset| is always kept. Empty = half the window for
# an explicit WINDOW_SIZE (the old default stride), planner.DEFAULT_OVERLAP with auto.
_C.INFERENCE.OVERLAP = []
# Memory one batch of windows may take (GB, estimated from the model's activations); bounds the
# automatic window and INFERENCE.BATCH_SIZE 0.
_C.INFERENCE.MEMORY_BUDGET_GB = 2.0
# Voxels cropped from each side of a window's output before blending (not at the volume border).
_C.INFERENCE.MARGIN = [1, 4, 4]
# gaussian | bump | constant
_C.INFERENCE.BLENDING = "gaussian"
# Windows per forward pass; 0 = as many as MEMORY_BUDGET_GB holds (at most 8).
_C.INFERENCE.BATCH_SIZE = 4
# Voxels with foreground probability below this are label 0 in the segmentation.
_C.INFERENCE.MWS_BACKGROUND = 0.5
# k > 0: the voxel mutex watershed's attractive weights are multiplied by min(foreground of both
# voxels) ** k, so edges through voxels the foreground head is less sure of are drawn later (infer.py,
# blockwise `mws` fragments and melecole-tune alike). 0 = off.
_C.INFERENCE.MWS_FOREGROUND_POWER = 0.0
# Sub-sample mutex edges by these strides (z, y, x); [1, 1, 1] keeps all.
_C.INFERENCE.MWS_STRIDES = [1, 1, 1]
_C.INFERENCE.MWS_RANDOMIZED_STRIDES = False
# After the watershed: segments smaller than this (voxels) are dropped, then (FILL_BACKGROUND)
# every voxel left at 0 gets a segment. Ground truth such as SNEMI3D's has no boundary class, and a
# predicted 0 is scored as one ordinary (huge, merging) segment.
_C.INFERENCE.MIN_SEGMENT_SIZE = 20
_C.INFERENCE.FILL_BACKGROUND = True
# How the fill gives voxels a segment: watershed (the segments flood 1 - foreground, meeting on the
# membranes; nearest where there is no foreground map) | nearest (the nearest segment in space).
# watershed: 0.20 bits better on medulla/val, 0.01-0.03 on fib-gala/val (bench/RESULTS.md).
_C.INFERENCE.FILL_MODE = "watershed"
# After the watershed, before the size filter: merge its segments on their region graph (the
# blockwise algorithm on one block; melecole/segmentation/agglomeration.py). none | mws (graph mutex
# watershed: mean nearest-neighbour affinity attracts, 1 - mean long-range affinity repels) | mean
# (merge neighbours whose mean nearest-neighbour affinity exceeds AGGLOMERATION_THRESHOLD, one shot)
# | gasp_average (hierarchical average linkage, GASP: the pair with the highest mean affinity merges
# next, its scores recomputed over all merged contacts, until none exceeds the threshold)
# | gasp_signed (the same on the signed graph: long-range contacts vote too, so they can keep apart
# two segments that touch; the GASP of Bailoni et al.)
# | mala_median (hierarchical, MALA-style: the highest median of the merged pairs' mean affinities
# merges next, until it is not above the threshold) | multicut (costs logit(mean affinity) -
# logit(threshold), times contacts; greedy additive + Kernighan-Lin). melecole-tune scores every
# mode and threshold on a labelled volume at once (docs/inference.md, Tuning).
_C.INFERENCE.AGGLOMERATION = "none"
_C.INFERENCE.AGGLOMERATION_THRESHOLD = 0.5
# Test-time augmentation (melecole/inference/tta.py): "none", or letters from "zyxt" (z / y / x flip,
# t = y<->x transpose, which needs a window with equal y and x); every combination of them is one
# variant ("yx": 4, "zyxt": 16). Per window, each variant's affinities are mapped back to the
# original frame and averaged before blending; costs one forward pass per variant.
_C.INFERENCE.TTA = "none"
# Where the model's forward pass runs (melecole/inference/backends.py): auto | torch | onnxruntime |
# openvino. auto picks the fastest one installed for the device; the affinities, blending and
# everything after the forward pass stay in torch/numpy.
_C.INFERENCE.BACKEND = "auto"

# --------------------------------------------------------------------------------------------------
# Logging and outputs
# --------------------------------------------------------------------------------------------------
_C.LOG = CN()
# Runs go to OUTPUT_PATH/<RUN_NAME>-<YYYYmmdd-HHMMSS>/; RUN_NAME "" = the config file's stem.
_C.LOG.OUTPUT_PATH = "outputs"
_C.LOG.RUN_NAME = ""
_C.LOG.CHECKPOINT_FREQUENCY = 5000
_C.LOG.LOG_FREQUENCY = 20
# Validation loss every VAL_FREQUENCY iterations on VAL_PATCHES fixed val patches; 0 disables.
_C.LOG.VAL_FREQUENCY = 1000
_C.LOG.VAL_PATCHES = 8
# Embedding PCA images to TensorBoard every IMAGE_FREQUENCY iterations; 0 disables.
_C.LOG.IMAGE_FREQUENCY = 1000
# Progress bars: auto (only when stderr is a terminal; periodic log lines otherwise, so SLURM logs
# and redirected output get no carriage-return updates) | true | false.
_C.LOG.PROGRESS_BAR = "auto"

# --------------------------------------------------------------------------------------------------
# System
# --------------------------------------------------------------------------------------------------
_C.SYSTEM = CN()
_C.SYSTEM.SEED = 0
# torch.use_deterministic_algorithms; slower, needed for bit-exact resume on GPU.
_C.SYSTEM.DETERMINISTIC = False


# --------------------------------------------------------------------------------------------------
# Blockwise segmentation (python -m melecole.blockwise, infer.py --blockwise): dask, large volumes.
# Also uses INFERENCE.OFFSETS, MWS_BACKGROUND, MWS_STRIDES, MIN_SEGMENT_SIZE and FILL_BACKGROUND.
# --------------------------------------------------------------------------------------------------
_C.BLOCKWISE = CN()
# Block (z, y, x) one task segments; a multiple of OUTPUT_CHUNKS. Memory per worker with 12 channels:
# ~0.6 GB per million voxels of block + halo for mws fragments, ~0.21 GB for watershed (docs/blockwise.md).
_C.BLOCKWISE.BLOCK_SHAPE = [64, 256, 256]
# Storage chunks (z, y, x) of the segmentation (zarr); every block is a whole number of chunks.
_C.BLOCKWISE.OUTPUT_CHUNKS = [32, 128, 128]
# Context (z, y, x) read around a block to compute its fragments; empty = twice the largest |offset|.
# Never less than the largest |offset| (the region graph needs that reach).
_C.BLOCKWISE.HALO = []
# Fragments per block: mws (voxel mutex watershed on block + halo, cropped) | watershed (seeded
# watershed on the nearest-neighbour boundary map, faster, more fragments).
_C.BLOCKWISE.FRAGMENTS = "mws"
# watershed fragments: voxels with boundary height (1 - their weakest nearest-neighbour affinity)
# below this are interior; seeds are maxima of the interior's distance transform, smoothed with SEED_SIGMA.
_C.BLOCKWISE.WATERSHED_THRESHOLD = 0.5
_C.BLOCKWISE.SEED_SIGMA = 1.0
# Fragments with fewer voxels (counted in block + halo; not those touching the halo's outer face)
# become background before the region graph, and the background fill (INFERENCE.FILL_BACKGROUND)
# gives their voxels the nearest segment at the end: fewer fragments and edges, so the global
# agglomeration needs less memory and time. -1 = auto: INFERENCE.MIN_SEGMENT_SIZE for mws fragments
# (voxel-MWS segments, which infer.py drops and fills the same way), 0 (keep all) for watershed.
_C.BLOCKWISE.MIN_FRAGMENT_SIZE = -1
# Agglomeration of the fragment graph: mws (graph mutex watershed: mean nearest-neighbour affinity
# attracts, 1 - mean long-range affinity repels) | mean (merge pairs whose mean nearest-neighbour
# affinity exceeds THRESHOLD; connected components) | gasp_average | gasp_signed | mala_median | multicut
# (hierarchical, THRESHOLD as INFERENCE.AGGLOMERATION_THRESHOLD above; melecole-tune --blockwise).
_C.BLOCKWISE.AGGLOMERATION = "mws"
_C.BLOCKWISE.THRESHOLD = 0.5
# Background fill (INFERENCE.FILL_BACKGROUND) looks this far (z, y, x) around a block for the nearest
# segment; voxels farther than that from every segment keep 0. Empty = HALO.
_C.BLOCKWISE.FILL_HALO = []
# Dask workers (processes, one thread each) of the LocalCluster when no scheduler address is given.
_C.BLOCKWISE.WORKERS = 2


def get_default_cfg() -> CN:
    """A fresh, mutable copy of the defaults."""
    return _C.clone()
