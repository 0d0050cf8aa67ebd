"""The hand-written story corpus (data, see README.md): what the readout vectors are
trained from, and the text the tiny model's tokenizer is trained on."""
