//! xe-svm: the SVM layer (being written).
