//! Positions grouped by token, for the embedding table's gradient (see `cuda/embedding.cu`).

use anyhow::{bail, Result};

/// The table `embedding_backward_wte` reads, and its number of groups: the distinct tokens of
/// `tokens` in ascending order, where each token's positions start in the position list (plus
/// the end of the last group), then every position sorted by (token, position).
pub(crate) fn token_groups(tokens: &[u32]) -> Result<(u32, Vec<u32>)> {
    let Ok(n) = u32::try_from(tokens.len()) else {
        bail!(
            "embedding backward: {} positions exceed 32-bit indices",
            tokens.len()
        );
    };
    let mut order: Vec<u32> = (0..n).collect();
    // Stable, and the positions start in order, so each group keeps its positions ascending.
    order.sort_by_key(|&p| tokens[p as usize]);
    let mut group_tokens = Vec::new();
    let mut starts = Vec::new();
    for (i, &p) in order.iter().enumerate() {
        let tok = tokens[p as usize];
        if group_tokens.last() != Some(&tok) {
            group_tokens.push(tok);
            starts.push(i as u32);
        }
    }
    starts.push(n);
    let groups = group_tokens.len() as u32;
    let mut table = group_tokens;
    table.extend(starts);
    table.extend(order);
    Ok((groups, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_grouped_by_token_in_order() {
        let tokens = [7, 3, 7, 7, 0, 3];
        let (groups, table) = token_groups(&tokens).unwrap();
        assert_eq!(groups, 3);
        let (toks, rest) = table.split_at(3);
        let (starts, order) = rest.split_at(4);
        assert_eq!(toks, [0, 3, 7]);
        assert_eq!(starts, [0, 1, 3, 6]);
        assert_eq!(order, [4, 1, 5, 0, 2, 3]);
    }

    #[test]
    fn every_position_lands_in_its_tokens_group() {
        let tokens: Vec<u32> = (0..1000u32).map(|i| (i * 7919) % 37).collect();
        let (groups, table) = token_groups(&tokens).unwrap();
        let g = groups as usize;
        let order = &table[2 * g + 1..];
        assert_eq!(order.len(), tokens.len());
        for j in 0..g {
            let (start, end) = (table[g + j] as usize, table[g + j + 1] as usize);
            let group = &order[start..end];
            assert!(!group.is_empty());
            assert!(group.iter().all(|&p| tokens[p as usize] == table[j]));
            assert!(group.windows(2).all(|w| w[0] < w[1]), "ascending positions");
        }
    }

    #[test]
    fn no_tokens_make_no_groups() {
        assert_eq!(token_groups(&[]).unwrap(), (0, vec![0]));
    }
}
