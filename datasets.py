"""Dataset construction (IMNET, image_folder, CIFAR, DIGITS, FAKE) and transforms."""
