"""fgds-engine: fast, batched feedback-guided data synthesis (Askari-Hemmat et al., TMLR 2024)."""

from .class_stats import LowRankClassStats, load_class_stats
from .conditioning import Conditioning
from .config import FeedbackOptions, RuntimeOptions, SamplerConfig
from .criteria import GaussianClassStats
from .sampler import FeedbackGuidedSampler, SampleOutput

__version__ = "0.1.0"
__all__ = ["Conditioning", "FeedbackGuidedSampler", "FeedbackOptions", "GaussianClassStats",
           "LowRankClassStats", "RuntimeOptions", "SampleOutput", "SamplerConfig", "load_class_stats"]
