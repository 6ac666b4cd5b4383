-- Inlined into every query that reads it; never stored.
MODEL (
  name sushi.item_prices,
  kind EMBEDDED
);

SELECT item_id, price FROM sushi.items WHERE price > 0
