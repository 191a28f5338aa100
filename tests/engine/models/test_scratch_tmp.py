import time, torch, transformers
def test_x(tiny_llama_dir, tiny_qwen2_dir, tiny_mistral_dir, tiny_gguf_path, tmp_path):
    from engine.models.loader import load_model
    for d in (tiny_llama_dir, tiny_qwen2_dir, tiny_mistral_dir):
        t=time.time(); m=load_model(str(d)); print(d, time.time()-t, m.arch)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d)
        ids = torch.tensor([[1, 30, 400, 5000, 20]])
        lg = hf(ids).logits[0, -1]
        print(lg.std(), lg.topk(3))
    t=time.time(); m=load_model(str(tiny_gguf_path), tmp_path); print('gguf', time.time()-t, m.arch)
