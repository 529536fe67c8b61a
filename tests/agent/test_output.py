"""CappedOutput: head and tail kept, the middle counted, UTF-8 decoded across reads."""

from dsv32.agent.output import CappedOutput


def test_short_output_is_kept_whole():
    out = CappedOutput(30)
    out.add("hello ")
    out.add("world")
    assert out.text() == "hello world" and out.dropped == 0


def test_long_output_keeps_two_thirds_head_one_third_tail_and_counts_the_rest():
    out = CappedOutput(9)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        out.add(ch)
    assert out.text() == "abcdef\n... [truncated: 17 more characters] ...\nxyz"  # 26 = 6 + 17 + 3


def test_a_character_split_between_two_reads_is_decoded_once():
    out = CappedOutput(100)
    data = "naïve → ok".encode()
    for i in range(len(data)):
        out.add_bytes(data[i:i + 1])
    out.add_bytes(b"", final=True)
    assert out.text() == "naïve → ok"
