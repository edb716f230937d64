"""DSPA: prompt-conditional SAE steering, the baselines that share its interface, and choosing their settings."""

from saealign.dspa.baselines import PromptPrefix, RepE, StaticSAE
from saealign.dspa.map import (DSPAMap, FitOptions, MapMetadata, Recommended, fit_map, fit_maps, merge_maps,
                               read_metadata)
from saealign.dspa.steer import DSPA, SteerConfig
from saealign.dspa.tune import TuneConfig, run_tune

__all__ = ["DSPA", "DSPAMap", "FitOptions", "MapMetadata", "PromptPrefix", "Recommended", "RepE", "StaticSAE",
           "SteerConfig", "TuneConfig", "fit_map", "fit_maps", "merge_maps", "read_metadata", "run_tune"]
