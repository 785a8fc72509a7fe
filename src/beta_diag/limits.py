"""Generous limits on sizes that untrusted files name, checked before anything is allocated.

Each is far beyond any classifier beta-diag is for; a file beyond one is refused with the limit named.
"""

MAX_INPUT_SIDE = 4096  # pixels: beyond this a single image's activations alone exhaust memory
MAX_CHANNELS = 256  # input channels
MAX_FEATURES = 1 << 20  # channels of one layer's output (a fingerprint point)
MAX_CLASSES = 1_000_000  # classes, labels and class names
MAX_NAME = 1_000  # characters in one class name
MAX_HISTORY = 100_000  # epochs of recorded history
MAX_IMAGE_PIXELS = 89_478_485  # one decoded image (PIL's own decompression-bomb limit)
MAX_BOOTSTRAP = 100_000  # bootstrap replicates: far beyond what a stable interval needs (1,000 is plenty)
MAX_BATCH = 1 << 16  # examples per batch
MAX_EPOCHS = MAX_HISTORY  # epochs to train: each becomes a history entry, which a checkpoint holds up to MAX_HISTORY
