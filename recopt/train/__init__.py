"""Training harness: metrics (AUC, LogLoss, NE), a reproducible train/eval loop,
trivial baselines and the quality-parity check used by every recopt pass."""
from .baselines import LogisticRegression, popularity_scores
from .loop import TrainConfig, TrainResult, evaluate, predict, seed_everything, train
from .metrics import Metrics, auc, binary_entropy, compute_metrics, log_loss, normalized_entropy
from .parity import ParityResult, max_output_difference, quality_parity

__all__ = ["LogisticRegression", "popularity_scores", "TrainConfig", "TrainResult", "evaluate", "predict",
           "seed_everything", "train", "Metrics", "auc", "binary_entropy", "compute_metrics", "log_loss",
           "normalized_entropy", "ParityResult", "max_output_difference", "quality_parity"]
