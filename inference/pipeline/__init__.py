"""Clinical inference for one study: the input plan, preprocessing, landmarks, the model's windows into lesions and
findings."""
