"""spectral-plasticity: measure and prevent loss of plasticity in deep continual learning.

Implements "Spectral Collapse Drives Loss of Plasticity in Deep Continual Learning"
(He, Guo, Prakash et al., arXiv 2509.22335).
"""

__version__ = "0.1.0"
