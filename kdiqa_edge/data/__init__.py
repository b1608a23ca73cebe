"""The IQA data layer: dataset readers, splits, the synthetic set and the uint8 image cache."""
