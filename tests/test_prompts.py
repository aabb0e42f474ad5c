from gpt2_triton.prompts import varied_prompts


def test_varied_prompts_are_distinct_and_varied():
    prompts = varied_prompts(32)
    assert len(prompts) == 32 and len(set(prompts)) == 32
    lengths = sorted(len(p.split()) for p in prompts)
    assert lengths[0] <= 3 and lengths[-1] >= 25
