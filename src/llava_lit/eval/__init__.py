"""Evaluation on the paper's benchmarks, from their official files: question files, scorers, tables, callback.

One benchmark class per benchmark (`scienceqa.ScienceQABenchmark`, `pope.PopeBenchmark`, `mme.MMEBenchmark`,
`vqa.VQABenchmark`, `world.WorldBenchmark`), each with `questions()`, `score(answers)`, `reference(qid)` and an
`image_folder`; `python -m llava_lit.eval` drives them, `callback.SampleAnswersCallback` uses them in training.
"""
