"""Structural detection of MoE blocks (no forward): candidates with expert layouts and scalar hints."""

from moe_compile.detect.candidate import Candidate, CanonicalWeights, ExpertLayout, Hints, RouterInfo, get_path
from moe_compile.detect.structure import find_candidates, match_block

__all__ = ["Candidate", "CanonicalWeights", "ExpertLayout", "Hints", "RouterInfo", "find_candidates", "get_path",
           "match_block"]
