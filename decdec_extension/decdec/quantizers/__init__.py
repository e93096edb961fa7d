"""decdec_setup's algorithms: quantizers (RTN, AWQ, SqueezeLLM, 3.5-bit split) and the steps that
turn an original model into a prepared directory (quantize, cheatsheet, thresholds)."""
from .pipeline import (BITS, METHODS, build_cheatsheet, check_out_dir, check_quant_settings, deployed_sizes,
                       measure_thresholds, parse_bits, quantize_to_dir)

__all__ = ["BITS", "METHODS", "build_cheatsheet", "check_out_dir", "check_quant_settings", "deployed_sizes",
           "measure_thresholds", "parse_bits", "quantize_to_dir"]
