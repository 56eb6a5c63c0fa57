"""segmerge: deep-supervised multimodal MRI segmentation whose many losses are merged by a
gradient aggregator (GMD, GradCraft, Gradient-Blending; Sum, Mean, PCGrad as baselines).

Architecture, one package each, in the order data flows:
``data`` -> ``nets`` -> ``objectives`` -> ``step`` (Jacobian, the one module that talks to
autograd) -> ``aggregation`` (pure maths on the Gramian) -> ``engine`` (training, MLflow,
checkpoints) -> ``inference`` (prediction, evaluation, MONAI bundle) -> ``study`` (comparisons).
"""

__version__ = "0.1.0"
