//! Entity-level precision, recall and F1 for sequence labeling with the CoNLL conventions that
//! Python's seqeval implements in its default mode (`get_entities`, `end_of_chunk`,
//! `start_of_chunk`): malformed sequences such as `O I-PER` still open an entity, a type change
//! inside a span closes it, and sentences never share an entity.

/// `(type, start, end)` spans, offsets into the sentences laid end to end with one `O` between.
pub fn entities(sentences: &[Vec<String>]) -> Vec<(String, usize, usize)> {
    let mut seq: Vec<&str> = Vec::new();
    for s in sentences {
        seq.extend(s.iter().map(String::as_str));
        seq.push("O");
    }
    seq.push("O");
    let (mut prev_tag, mut prev_type) = ('O', String::new());
    let mut begin = 0;
    let mut out = Vec::new();
    for (i, chunk) in seq.iter().enumerate() {
        let tag = chunk.chars().next().unwrap_or('O');
        let rest: String = chunk.chars().skip(1).collect();
        let type_ = rest
            .split_once('-')
            .map(|(_, t)| t.to_string())
            .unwrap_or(rest);
        let type_ = if type_.is_empty() {
            "_".to_string()
        } else {
            type_
        };
        if end_of_chunk(prev_tag, tag, &prev_type, &type_) {
            out.push((prev_type.clone(), begin, i - 1));
        }
        if start_of_chunk(prev_tag, tag, &prev_type, &type_) {
            begin = i;
        }
        prev_tag = tag;
        prev_type = type_;
    }
    out
}

fn end_of_chunk(prev: char, tag: char, prev_type: &str, type_: &str) -> bool {
    matches!(prev, 'E' | 'S')
        || (matches!(prev, 'B' | 'I') && matches!(tag, 'B' | 'S' | 'O'))
        || (prev != 'O' && prev != '.' && prev_type != type_)
}

fn start_of_chunk(prev: char, tag: char, prev_type: &str, type_: &str) -> bool {
    matches!(tag, 'B' | 'S')
        || (matches!(prev, 'E' | 'S' | 'O') && matches!(tag, 'E' | 'I'))
        || (tag != 'O' && tag != '.' && prev_type != type_)
}

/// Micro-averaged entity precision, recall and F1 (0 where undefined, as seqeval).
pub fn precision_recall_f1(gold: &[Vec<String>], pred: &[Vec<String>]) -> (f64, f64, f64) {
    use std::collections::HashSet;
    let g: HashSet<_> = entities(gold).into_iter().collect();
    let p: HashSet<_> = entities(pred).into_iter().collect();
    let tp = g.intersection(&p).count() as f64;
    let precision = if p.is_empty() {
        0.0
    } else {
        tp / p.len() as f64
    };
    let recall = if g.is_empty() {
        0.0
    } else {
        tp / g.len() as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    (precision, recall, f1)
}
