"""Evaluation on the paper's benchmarks, from their official files: question files, scorers, tables, callback.

One benchmark class per benchmark (`scienceqa.ScienceQABenchmark`, `pope.PopeBenchmark`, `mme.MMEBenchmark`,
`vqa.VQABenchmark`; applications add their own, as `llava_lit.world.benchmark.WorldBenchmark`), each with
`questions()`, `score(answers)`, `reference(qid)` and an `image_folder`; `run.evaluate` (and `python -m
llava_lit.eval` through it) drives them, `callback.SampleAnswersCallback` uses them in training.
"""
