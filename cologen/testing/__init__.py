"""Test stand-ins: tiny random models and schema-exact data, built through the same loading code as the real ones
(no downloads). Used by the tests, by the CPU modes of the benchmarks and for dry runs of the data recipes.

flux.py: a tiny FLUX.1 pipeline folder and the toy-size FLUX transformer config; metric_models.py: the metric
networks (CLIP, DINO, Inception, depth, segmentation, map detectors); recipe_fixtures.py: small copies of the
public datasets' releases; cli.py: `cologen` run in-process with its exit status and output.
"""
