"""On-device sampling, teacher-forced likelihoods, reward read-outs and best-of-K."""
