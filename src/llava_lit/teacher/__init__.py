"""Teacher-generated instruction data (the paper's LLaVA-Instruct recipe) for any images with captions and boxes.

A language-only teacher that never sees the image reads its captions and object boxes and writes three kinds
of data: multi-turn conversations, detailed descriptions and complex-reasoning questions. `annotations` reads
the inputs, `prompts` the editable prompt folders, `replies` parses and filters what the teacher writes, and
`pipeline` runs it all through `llava_lit.openai_client` with a resumable cache. `python -m llava_lit.generate`
is the command-line entry point.
"""
