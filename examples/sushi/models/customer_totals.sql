MODEL (
  name sushi.customer_totals,
  kind FULL,
  end '2024-03-31',
  grain customer_id
);

SELECT
  customer_id,
  COUNT(*) AS order_count,
  SUM(quantity) AS items
FROM sushi.orders
GROUP BY customer_id
