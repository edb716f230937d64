"""Evaluation harnesses: MT-Bench, AlpacaEval, multiple choice, judge-free preference metrics, attribute
benchmarks, judges and reports. Every harness returns `saealign.results.ResultRecord`s with
`saealign.stats` estimates; the model runtime they share is `saealign.runtime`.
"""
