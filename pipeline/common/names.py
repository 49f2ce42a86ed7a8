"""Every file name the pipeline writes inside its output folders, in one place (the Parquet layout's
names are in `schema.py`). Readers and writers import them from here."""

# an open_clip model folder (teacher, student): loadable with open_clip's `local-dir:` schema
WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # state dict (torch.load(weights_only=True))
OPEN_CLIP_CONFIG = "open_clip_config.json"  # model_name, model_cfg, preprocess_cfg
DEMO_CARD = "card.json"  # beside shipped demo weights: samples seen, world, wall time, sha256
IDENTITY_FILE = "teacher_identity.json"  # in the teacher folder: what every Parquet file records

# a training run's folder (student, or demo teacher)
CHECKPOINT_FILE = "checkpoint.pt"  # resumable state
TRAIN_LOG_FILE = "train_log.jsonl"  # one JSON record per logged step, once the run has ended
RUNNING_LOG_FILE = "train_log.running.jsonl"  # the same while the run goes (replaces TRAIN_LOG_FILE at the end)
TRAIN_SUMMARY_FILE = "train_summary.json"
DVCLIVE_DIR = "dvclive"  # DVCLive's metrics.json and plots/ (train.live_dir: auto)

# dsmd export's folder
SAFETENSORS_FILE = "open_clip_model.safetensors"  # open_clip's HF_SAFE_WEIGHTS_NAME
IMAGE_ONNX = "image_encoder.onnx"
TEXT_ONNX = "text_encoder.onnx"
EXPORT_REPORT = "export_report.json"
MODEL_CARD = "README.md"

# dsmd evaluate's plots folder
QUALITY_PLOT = "quality_vs_time.png"
QUALITY_DATA = "quality_vs_time.json"
CURVES_PLOT = "training_curves.png"

# dsmd evaluate's report folder (evaluate.report_dir): a static page and what it shows
REPORT_FILE = "index.html"
REPORT_THUMBS = "thumbs"  # <image row>.png, decoded from the split's image bytes

# dsmd corpus's folder (the synthetic world)
CORPUS_MANIFEST = "manifest.yaml"
CORPUS_REPORT = "corpus_report.json"  # concept frequencies per split, test ambiguity
CORPUS_CONFIG_RECORD = "corpus_config.json"  # hash of the config the shards in out_dir were generated with
CORPUS_ZEROSHOT_DIR = "zeroshot"  # <task>/: labelled shards of the zero-shot tasks

# work files inside a stage's output folder, gone when the stage finishes
EXTRACT_RUN_FILE = "_run.json"  # inside a split's _parts/: what the parts were computed with
MINE_WORK_DIR = "_work"  # indexes and per-rank parts under torchrun; removed when the split is done
