"""The chat command driven through a pseudo-terminal: streaming answers, /image, /reset, bad images, /quit."""

from __future__ import annotations

import sys

import pytest

from inference_helpers import png_bytes

pexpect = pytest.importorskip("pexpect")


@pytest.mark.slow
def test_chat_through_a_pseudo_terminal(tiny_checkpoint, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(png_bytes(1))
    second.write_bytes(png_bytes(2))
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "llava_lit.chat",
            f"checkpoint={tiny_checkpoint}",
            f"image={first}",
            "temperature=0",
            "max_new_tokens=6",
            "device=cpu",
        ],
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=120,
    )
    child.expect(r"Commands: /image PATH, /reset, /quit")
    child.expect(rf"\(image {first}; new conversation\)")
    child.expect("USER: ")
    child.sendline("What is in the picture?")
    child.expect("ASSISTANT: ")
    child.expect("USER: ")
    first_answer = child.before.strip()
    assert first_answer  # a tiny random model still says something

    child.sendline("/reset")
    child.expect(r"\(conversation reset\)")
    child.expect("USER: ")
    child.sendline("What is in the picture?")
    child.expect("ASSISTANT: ")
    child.expect("USER: ")
    assert child.before.strip() == first_answer  # greedy, same image, fresh conversation: same answer

    child.sendline(f"/image {tmp_path / 'nope.png'}")
    child.expect("cannot use image")
    child.expect("USER: ")
    child.sendline(f"/image {second}")
    child.expect(rf"\(image {second}; new conversation\)")
    child.expect("USER: ")
    child.sendline("And now?")
    child.expect("ASSISTANT: ")
    child.expect("USER: ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not list(tmp_path.glob("*.log"))
