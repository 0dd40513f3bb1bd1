"""Token ids with a fixed meaning, T5's convention (every vocabulary stmoe trains or loads uses them).

pad 0 (also the decoder's start token), eos 1, unk 2, no bos; the 100 extra ids (sentinels
<extra_id_0> .. <extra_id_99>) sit at the top of the vocabulary, <extra_id_0> = vocab_size - 1.
"""

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
NUM_EXTRA_IDS = 100
